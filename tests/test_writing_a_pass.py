"""docs/writing-a-pass.md stays true: its pass and its tests are taken from the page and
run here, and the files, flags and error message it quotes are checked against piperc."""

import ast
import re
import sys
import types
from pathlib import Path

import pytest

from piperc.errors import PassError
from piperc.opt import build_parser, main
from piperc.passes import PASSES

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "writing-a-pass.md"
DOC_TEXT = DOC.read_text()


def example(marker: str) -> str:
    """The ```python block after `<!-- example: MARKER -->`, padded with blank lines so
    that line numbers in a traceback are the page's."""
    blocks = list(
        re.finditer(rf"<!-- example: {marker} -->\n```python\n(.*?)```", DOC_TEXT, re.DOTALL)
    )
    assert len(blocks) == 1, f"{DOC} needs exactly one block marked `example: {marker}`"
    first_line = DOC_TEXT.count("\n", 0, blocks[0].start(1))
    return "\n" * first_line + blocks[0].group(1)


def doc_test_names() -> list[str]:
    tree = ast.parse(example("test"))
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    return [n for n in names if n.startswith("test_")]


def load_pass(source: str) -> types.ModuleType:
    """Runs the page's pass as module `fold_mul_one`, which its test imports."""
    module = types.ModuleType("fold_mul_one")
    sys.modules["fold_mul_one"] = module
    exec(compile(source, str(DOC), "exec"), module.__dict__)
    return module


def load_tests() -> dict:
    namespace = {"__name__": "test_fold_mul_one"}
    exec(compile(example("test"), str(DOC), "exec"), namespace)
    return namespace


@pytest.fixture
def clean_registry(monkeypatch):
    """The page registers fold-mul-one; the registry and sys.modules are restored after."""
    monkeypatch.setitem(sys.modules, "fold_mul_one", None)
    saved = dict(PASSES)
    yield
    PASSES.clear()
    PASSES.update(saved)


@pytest.fixture
def doc_tests(clean_registry) -> dict:
    load_pass(example("pass"))
    return load_tests()


@pytest.mark.parametrize("name", doc_test_names())
def test_doc_example(doc_tests, name: str):
    doc_tests[name]()


def test_doc_has_tests():
    assert len(doc_test_names()) >= 3


def test_doc_pass_is_a_registered_frozen_dataclass_with_an_option(clean_registry):
    module = load_pass(example("pass"))
    cls = module.FoldMulOnePass
    assert PASSES["fold-mul-one"]() is cls
    assert cls() == cls(keep_int=False) != cls(keep_int=True)
    with pytest.raises(AttributeError):
        cls().keep_int = True
    assert "keep-int" in cls.__doc__


def test_doc_pass_runs_from_piperc_opt(clean_registry, tmp_path, capsys):
    load_pass(example("pass"))
    model = tmp_path / "scale.mlir"
    model.write_text(
        """func.func @main(%x: !torch.vtensor<[2],f32>) -> !torch.vtensor<[2],f32> {
  %int1 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
  %y = "torch.aten.mul.Scalar"(%x, %int1) : (!torch.vtensor<[2],f32>, !torch.int) -> !torch.vtensor<[2],f32>
  func.return %y : !torch.vtensor<[2],f32>
}
"""
    )
    assert main([str(model), "-p", "fold-mul-one,dce", "--dump-dir", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == (
        "builtin.module {\n"
        "  func.func @main(%x: !torch.vtensor<[2],f32>) -> !torch.vtensor<[2],f32> {\n"
        "    func.return %x : !torch.vtensor<[2],f32>\n"
        "  }\n"
        "}\n"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00-input.mlir", "01-fold-mul-one.mlir", "02-dce.mlir"
    ]


def test_verification_catches_the_pass_without_its_type_check(clean_registry):
    """The page says what happens without the type check; this is that pass."""
    type_check = (
        "        if x.type != op.results[0].type:\n"
        "            return\n"
    )
    source = example("pass")
    assert type_check in source
    load_pass(source.replace(type_check, ""))
    tests = load_tests()
    with pytest.raises(PassError) as e:
        tests["test_leaves_other_multiplications_alone"]()
    assert f"piperc.errors.PassError: {e.value}\n" in DOC_TEXT


def test_doc_mentions_fold_detach_as_the_model():
    assert "passes/fold_detach.py" in DOC_TEXT
    assert (REPO / "passes/fold_detach.py").exists()


def test_files_and_flags_the_doc_names_exist():
    for path in set(re.findall(r"\bpiperc/[\w/]+\.py\b", DOC_TEXT)):
        assert (REPO / path).exists(), path
    flags = {s for action in build_parser()._actions for s in action.option_strings}
    for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", DOC_TEXT)):
        assert flag in flags, flag
