"""Schedules as data: built-ins, user tables, validation errors, simulation, pictures, the
tabular view, and agreement with torch.distributed.pipelining's schedules."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from piperc.schedules import (
    Action,
    ClosedForm,
    Message,
    Schedule,
    ScheduleError,
    bubble_fraction,
    builtin,
    closed_form_bubble,
    from_lists,
    from_table,
    gpipe,
    interleaved,
    messages,
    one_f_one_b,
    peak_in_flight,
    receive_plan,
    render_svg,
    render_text,
    save_svg,
    simulate,
    validate,
)

SIZES = [(2, 4), (4, 8), (4, 4), (2, 1), (3, 5)]

# ---------------------------------------------------------------- actions


@pytest.mark.parametrize("text", ["0F1", "1B0", "0W3", "12F34"])
def test_action_round_trips(text):
    assert str(Action.parse(text)) == text


def test_action_fields():
    assert Action.parse("2W7") == Action(stage=2, kind="W", microbatch=7)


@pytest.mark.parametrize("text", ["0X1", "F1", "0F", "0f1", "-1F0", "0F1 ", ""])
def test_bad_action_text_is_named(text):
    with pytest.raises(ScheduleError, match=f"'{text}' is not a schedule action"):
        Action.parse(text)


# ---------------------------------------------------------------- built-in schedules


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,mbs", SIZES)
def test_builtin_validates_and_runs_each_action_once(name, stages, mbs):
    schedule = builtin(name, stages, mbs)
    validate(schedule)
    actions = [a for row in schedule.devices for a in row]
    expected = {Action(s, k, m) for s in range(stages) for k in "FB" for m in range(mbs)}
    assert len(actions) == len(expected) and set(actions) == expected
    assert schedule.stage_device == {s: s for s in range(stages)}
    assert all(
        schedule.device_of(a.stage) == d for d, row in enumerate(schedule.devices) for a in row
    )


def test_gpipe_rows():
    assert gpipe(2, 3).to_rows() == [
        ["0F0", "0F1", "0F2", "0B0", "0B1", "0B2"],
        ["1F0", "1F1", "1F2", "1B0", "1B1", "1B2"],
    ]


def test_1f1b_rows_2_stages_4_microbatches():
    assert one_f_one_b(2, 4).table() == (
        "device 0: 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3\ndevice 1: 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3"
    )


def test_1f1b_rows_4_stages_8_microbatches():
    assert one_f_one_b(4, 8).table() == (
        "device 0: 0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7\n"
        "device 1: 1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 1B6 1B7\n"
        "device 2: 2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7\n"
        "device 3: 3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7"
    )


def test_1f1b_with_fewer_microbatches_than_stages():
    assert one_f_one_b(4, 2).to_rows()[0] == ["0F0", "0F1", "0B0", "0B1"]
    validate(one_f_one_b(4, 2))


def test_unknown_builtin_lists_known_names():
    with pytest.raises(ScheduleError, match=r"unknown schedule 'zb'.*1f1b, .*gpipe"):
        builtin("zb", 2, 4)


def test_builtin_needs_a_stage_and_a_microbatch():
    with pytest.raises(ScheduleError, match="0 microbatches"):
        gpipe(2, 0)


def test_builtin_takes_the_device_count():
    assert builtin("1f1b", 4, 8, num_devices=4).to_rows() == one_f_one_b(4, 8).to_rows()
    assert builtin("interleaved", 8, 4, num_devices=4).to_rows() == interleaved(8, 4, 4).to_rows()


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_single_stage_builtins_refuse_several_stages_per_device(name):
    with pytest.raises(ScheduleError, match=(
        f"schedule '{name}' runs one stage per device, but got 8 stages for 4 devices; "
        f"use schedule 'interleaved' to run several stages per device, or give 4 stages"
    )):
        builtin(name, 8, 8, num_devices=4)


def test_interleaved_rows_2_devices_4_stages_3_microbatches():
    schedule = interleaved(4, 3, 2)
    assert schedule.table() == (
        "device 0: 0F0 0F1 0F2 2F0 2F1 2F2 2B0 2B1 2B2 0B0 0B1 0B2\n"
        "device 1: 1F0 1F1 1F2 3F0 3B0 3F1 3B1 3F2 3B2 1B0 1B1 1B2"
    )
    assert schedule.stage_device == {0: 0, 1: 1, 2: 0, 3: 1}
    validate(schedule)


def test_interleaved_rows_4_devices_8_stages_8_microbatches():
    """Two rounds of 4 microbatches; device d warms up with 4 + 2 * (3 - d) forwards."""
    assert interleaved(8, 8, 4).table() == (
        "device 0: 0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3 0F4 0F5 0F6 4B0 0F7 4B1 4F4 4B2 "
        "4F5 4B3 4F6 0B0 4F7 0B1 0B2 0B3 4B4 4B5 4B6 4B7 0B4 0B5 0B6 0B7\n"
        "device 1: 1F0 1F1 1F2 1F3 5F0 5F1 5F2 5F3 1F4 5B0 1F5 5B1 1F6 5B2 1F7 5B3 "
        "5F4 1B0 5F5 1B1 5F6 1B2 5F7 1B3 5B4 5B5 5B6 5B7 1B4 1B5 1B6 1B7\n"
        "device 2: 2F0 2F1 2F2 2F3 6F0 6F1 6F2 6B0 6F3 6B1 2F4 6B2 2F5 6B3 2F6 2B0 "
        "2F7 2B1 6F4 2B2 6F5 2B3 6F6 6B4 6F7 6B5 6B6 6B7 2B4 2B5 2B6 2B7\n"
        "device 3: 3F0 3F1 3F2 3F3 7F0 7B0 7F1 7B1 7F2 7B2 7F3 7B3 3F4 3B0 3F5 3B1 "
        "3F6 3B2 3F7 3B3 7F4 7B4 7F5 7B5 7F6 7B6 7F7 7B7 3B4 3B5 3B6 3B7"
    )


@pytest.mark.parametrize("stages,mbs,devices", [(8, 4, 4), (8, 7, 4), (8, 3, 4), (4, 2, 2),
                                                (4, 3, 2), (6, 2, 2), (12, 5, 4), (3, 8, 3)])
def test_interleaved_validates_with_loop_placement(stages, mbs, devices):
    schedule = interleaved(stages, mbs, devices)
    validate(schedule)
    assert schedule.stage_device == {s: s % devices for s in range(stages)}


def test_interleaved_with_one_stage_per_device_is_torchs_order_not_1f1b():
    """v = 1 warms up with 2 * (p - 1 - d) forwards, 1F1B with p - 1 - d: same bubble,
    more activations held."""
    schedule = builtin("interleaved", 4, 8)
    assert schedule.to_rows()[0][:8] == ["0F0", "0F1", "0F2", "0F3", "0F4", "0F5", "0F6", "0B0"]
    assert peak_in_flight(schedule) == [7, 5, 3, 1]
    assert peak_in_flight(one_f_one_b(4, 8)) == [4, 3, 2, 1]
    assert simulate(schedule).bubble_fraction == pytest.approx(bubble_fraction(4, 8))


@pytest.mark.parametrize("stages,mbs,devices,message", [
    (6, 8, 4, "schedule 'interleaved': 6 stages do not divide evenly over 4 devices; stage s "
              "runs on device s % 4, so give a multiple of 4 stages, e.g. 8"),
    (2, 8, 4, "2 stages do not divide evenly over 4 devices"),
    (8, 9, 4, r"schedule 'interleaved': 9 microbatches on 4 devices run in max\(1, 9 // 4\) = 2 "
              r"rounds and do not split evenly into them \(torch's ScheduleInterleaved1F1B "
              r"refuses this too\); use 8 or 10 microbatches"),
    (4, 7, 2, r"7 microbatches on 2 devices run in max\(1, 7 // 2\) = 3 rounds .* use 6 or 8"),
    (8, 8, 0, "schedule 'interleaved' needs at least one device, got 0"),
    (8, 0, 4, "a schedule needs at least one stage and one microbatch"),
])
def test_interleaved_refuses_what_torch_refuses(stages, mbs, devices, message):
    with pytest.raises(ScheduleError, match=message):
        interleaved(stages, mbs, devices)


def test_interleaved_with_two_rounds_posts_the_crossing_receives_early():
    """piperc's compiled programs issue a step's sends with the next step's receives, one
    batch at a time, and a send completes only once its receive is posted (NCCL's rule).
    With m >= 2p microbatches torch's order crosses gradient sends: at pp=2, m=4 device 1
    sends 3B1's gradient before it posts the receive of 2B0's, and device 0 sends 2B0's
    before it posts the receive of 3B1's (torch's runtime relies on sends that complete
    without their receive). `receive_plan` has device 1 receive 2B0's gradient in the batch
    it was stuck at (the one before 1F2, with its send of 3B1's), rather than before 1B0,
    and so on down the row; device 0 needs none."""
    plan = receive_plan(interleaved(4, 4, 2))
    assert plan[0] == {}
    assert {str(a): [str(m.producer) for m in ms] for a, ms in plan[1].items()} == {
        "1F2": ["2B0"], "1B0": ["0F3"], "1F3": ["2B1"], "1B1": ["2F2"]}
    for stages, mbs, devices in [(4, 4, 2), (8, 8, 4), (4, 8, 2), (6, 6, 3), (12, 16, 4)]:
        validate(interleaved(stages, mbs, devices))


def test_one_f_one_b_and_gpipe_need_no_early_receive():
    for name in ("gpipe", "1f1b"):
        for stages, mbs in [(2, 4), (4, 8), (4, 2)]:
            assert receive_plan(builtin(name, stages, mbs)) == [{} for _ in range(stages)]


# ---------------------------------------------------------------- user schedules


@pytest.mark.parametrize("stages,mbs", SIZES)
def test_table_round_trips(stages, mbs):
    schedule = one_f_one_b(stages, mbs)
    loaded = from_table(schedule.table(), name="1f1b")
    assert loaded.to_rows() == schedule.to_rows()
    assert (loaded.num_stages, loaded.num_microbatches) == (stages, mbs)
    assert loaded.stage_device == schedule.stage_device


def test_table_syntax():
    schedule = from_table(
        """
        # a 1F1B by hand
        device 0: 0F0, 0F1, 0B0, 0B1   # commas are fine
        1F0 1B0 1F1 1B1
        """,
        name="hand",
    )
    assert schedule.name == "hand"
    assert schedule.to_rows() == [["0F0", "0F1", "0B0", "0B1"], ["1F0", "1B0", "1F1", "1B1"]]
    validate(schedule)


def test_from_lists_infers_sizes_and_devices():
    schedule = from_lists([["0F0", "2F0", "2B0", "0B0"], ["1F0", "1B0"]])
    assert (schedule.num_stages, schedule.num_microbatches) == (3, 1)
    assert schedule.stage_device == {0: 0, 2: 0, 1: 1}
    validate(schedule)


def test_from_lists_takes_actions():
    rows = one_f_one_b(2, 2).devices
    assert from_lists(rows).to_rows() == one_f_one_b(2, 2).to_rows()


def test_explicit_sizes_are_kept():
    schedule = from_lists([["0F0", "0B0"]], num_stages=1, num_microbatches=2)
    with pytest.raises(ScheduleError, match="action 0F1 is missing"):
        validate(schedule)


def test_table_device_label_must_match_row():
    with pytest.raises(ScheduleError, match="line 2: labelled device 2 but it is row 1"):
        from_table("device 0: 0F0 0B0\ndevice 2: 1F0 1B0")


# ---------------------------------------------------------------- errors

ERRORS = [
    (
        "duplicate",
        "device 0: 0F0 0F1 0B0 0B1\ndevice 1: 1F0 1B0 1F1 1B1 1B0",
        "schedule 'bad': action 1B0 on device 1 appears twice",
    ),
    (
        "missing",
        "device 0: 0F0 0F1 0B0 0B1\ndevice 1: 1F0 1B0 1F1",
        "schedule 'bad': action 1B1 is missing",
    ),
    (
        "B before F",
        "device 0: 0F0 0B1 0B0 0F1\ndevice 1: 1F0 1B0 1F1 1B1",
        "schedule 'bad': 0B1 runs before 0F1 on device 0",
    ),
    (
        "W before B",
        "device 0: 0F0 0B0 0W0\ndevice 1: 1F0 1W0 1B0",
        "schedule 'bad': 1W0 runs before 1B0 on device 1",
    ),
    (
        "W for one microbatch only",
        "device 0: 0F0 0F1 0B0 0W0 0B1\ndevice 1: 1F0 1B0 1F1 1B1",
        "schedule 'bad': action 0W1 is missing",
    ),
    (
        "deadlock",
        "device 0: 0F0 0B0 0F1 0B1\ndevice 1: 1F1 1B1 1F0 1B0",
        "schedule 'bad': deadlock: device 0 waits at 0B0 for 1B0 on device 1; "
        "device 1 waits at 1F1 for 0F1 on device 0",
    ),
]


@pytest.mark.parametrize("table,expected", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_validate_names_the_offending_action(table, expected):
    schedule = from_table(table, name="bad")
    with pytest.raises(ScheduleError) as error:
        validate(schedule)
    assert expected in str(error.value)


def test_messages_consumed_out_of_order_are_received_early_in_send_order():
    # Transfers between two devices match in issue order: device 1 runs 1F1 first, so the
    # batch before it receives 0F0's output (sent first) too, and 1F0 later finds it there.
    schedule = from_table("device 0: 0F0 0F1 0B0 0B1\ndevice 1: 1F1 1F0 1B0 1B1")
    validate(schedule)
    (early,) = receive_plan(schedule)[1].values()
    assert list(receive_plan(schedule)[1]) == [Action.parse("1F1")]
    assert [(m.kind, str(m.producer)) for m in early] == [("act", "0F0")]


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("microbatches", [1, 4, 8])
def test_builtin_schedules_issue_messages_in_one_order_on_both_sides(kind, stages, microbatches):
    validate(builtin(kind, stages, microbatches))


def test_stage_out_of_range():
    schedule = from_table("0F0 0B0\n1F0 1B0 2F0", num_stages=2)
    with pytest.raises(ScheduleError, match="action 2F0 on device 1: stage 2 is out of range"):
        validate(schedule)


def test_stage_split_across_devices():
    with pytest.raises(ScheduleError, match="action 1F1 on device 0 but stage 1 runs on device 1"):
        from_table("device 0: 0F0 0F1 1F1 0B0 0B1\ndevice 1: 1F0 1B0 1B1", name="split")


def test_action_on_the_wrong_device():
    schedule = one_f_one_b(2, 2)
    schedule.stage_device = {0: 1, 1: 1}
    with pytest.raises(ScheduleError, match="action 0F0 on device 0 but stage 0 runs on device 1"):
        validate(schedule)


def test_bad_action_text_in_a_table():
    with pytest.raises(ScheduleError, match=r"line 2: '1Q0' is not a schedule action"):
        from_table("0F0 0B0\n1F0 1Q0")


def test_bad_action_text_in_lists():
    with pytest.raises(ScheduleError, match=r"device 1: '1B' is not a schedule action"):
        from_lists([["0F0", "0B0"], ["1F0", "1B"]])


def test_error_is_the_first_in_device_order():
    schedule = from_table("0F0 0B0 0B0\n1F0 1B0 1B0", name="twice")
    with pytest.raises(ScheduleError, match="action 0B0 on device 0 appears twice"):
        validate(schedule)


# ---------------------------------------------------------------- messages


def test_messages_of_1f1b():
    sent = {m: (m.producer, m.consumer) for m in messages(one_f_one_b(2, 2))[(0, 1)]}
    act0 = Message(0, 1, "act", 0, 0, tag=0)
    grad0 = Message(1, 0, "grad", 1, 0, tag=5)
    assert sent[act0] == (Action(0, "F", 0), Action(1, "F", 0))
    assert sent[grad0] == (Action(1, "B", 0), Action(0, "B", 0))


def test_messages_in_each_sides_order():
    by_side = messages(one_f_one_b(2, 2))
    as_text = {
        side: [f"{m.kind} {m.producer}->{m.consumer}" for m in ms] for side, ms in by_side.items()
    }
    # device 0: 0F0 0F1 0B0 0B1; device 1: 1F0 1B0 1F1 1B1
    assert as_text[(0, 1)] == ["act 0F0->1F0", "act 0F1->1F1", "grad 1B0->0B0", "grad 1B1->0B1"]
    assert as_text[(1, 0)] == ["act 0F0->1F0", "grad 1B0->0B0", "act 0F1->1F1", "grad 1B1->0B1"]


@pytest.mark.parametrize("stages,mbs", SIZES)
def test_message_tags_are_unique_and_sides_agree(stages, mbs):
    by_side = messages(one_f_one_b(stages, mbs))
    tags = [m.tag for ms in by_side.values() for m in ms]
    assert len(tags) == 2 * len(set(tags)) == 2 * 2 * (stages - 1) * mbs
    for (d, peer), ms in by_side.items():
        assert set(ms) == set(by_side[(peer, d)])


def test_no_messages_between_stages_on_one_device():
    schedule = from_lists([["0F0", "1F0", "1B0", "0B0"], ["2F0", "2B0"]])
    validate(schedule)
    kinds = [f"{m.kind} {m.stage}" for m in messages(schedule)[(0, 1)]]
    assert kinds == ["act 1", "grad 2"]


# ---------------------------------------------------------------- simulation


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,mbs", SIZES)
def test_simulated_makespan_and_bubble(name, stages, mbs):
    timeline = simulate(builtin(name, stages, mbs), f_time=1.0, b_time=2.0)
    assert timeline.makespan == (mbs + stages - 1) * 3.0
    assert timeline.bubble_fraction == pytest.approx(bubble_fraction(stages, mbs))


def test_1f1b_p4_m8():
    timeline = simulate(one_f_one_b(4, 8), f_time=1, b_time=2)
    assert timeline.makespan == 33
    assert timeline.bubble_fraction == pytest.approx(3 / 11)
    assert timeline.devices[3][:3] == [
        (Action(3, "F", 0), 3, 4),
        (Action(3, "B", 0), 4, 6),
        (Action(3, "F", 1), 6, 7),
    ]


def test_comm_time_delays_the_receiver():
    timeline = simulate(gpipe(2, 1), f_time=1, b_time=2, comm_time=0.5)
    assert [tuple(s) for s in timeline.devices[1]] == [
        (Action(1, "F", 0), 1.5, 2.5),
        (Action(1, "B", 0), 2.5, 4.5),
    ]
    assert timeline.makespan == 7.0


def test_w_runs_after_b():
    schedule = from_table("0F0 0F1 0B0 0B1 0W0 0W1\n1F0 1B0 1F1 1B1 1W0 1W1")
    timeline = simulate(schedule, f_time=1, b_time=1, w_time=1)
    assert [str(s.action) for s in timeline.devices[0][-2:]] == ["0W0", "0W1"]
    assert timeline.makespan == 8


def test_overlap_group_runs_concurrently():
    schedule = from_table("0F0 0F1 0B0 0B1\n1F0 1F1 1B0 1B1")
    sequential = simulate(schedule).makespan
    schedule.overlap = [[], [(Action(1, "F", 1), Action(1, "B", 0))]]
    timeline = simulate(schedule)
    slots = {str(s.action): (s.start, s.end) for s in timeline.devices[1]}
    assert slots["1F1"][0] == slots["1B0"][0] == 2
    assert timeline.makespan < sequential


def test_overlap_group_must_be_contiguous():
    schedule = one_f_one_b(2, 2)
    schedule.overlap = [[(Action(0, "F", 0), Action(0, "B", 1))], []]
    with pytest.raises(ScheduleError, match=r"overlap group \[0F0 0B1\] on device 0"):
        validate(schedule)


def test_simulate_validates_first():
    schedule = Schedule("empty", 1, 1, [[Action(0, "F", 0)]], {0: 0})
    with pytest.raises(ScheduleError, match="action 0B0 is missing"):
        simulate(schedule)


# ---------------------------------------------------------------- rendering


def test_render_text():
    text = render_text(simulate(one_f_one_b(2, 2), f_time=1, b_time=2))
    assert text == (
        "time     | 0  1  2  3  4  5  6  7  8\n"
        "device 0 | F0 F1 .  .  B0 B0 .  B1 B1\n"
        "device 1 | .  F0 B0 B0 F1 B1 B1 .  .\n"
        "1f1b: makespan 9, bubble 33.3%\n"
    )


def test_render_svg_is_valid_xml(tmp_path):
    timeline = simulate(one_f_one_b(4, 8))
    svg = render_svg(timeline)
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    rects = root.findall(".//{http://www.w3.org/2000/svg}g/{http://www.w3.org/2000/svg}rect")
    assert len(rects) == 4 * 8 * 2
    path = tmp_path / "1f1b.svg"
    save_svg(timeline, path)
    assert ET.parse(path).getroot().tag == root.tag


# ---------------------------------------------------------------- tabular view


def test_view_of_1f1b():
    view = one_f_one_b(4, 8).view({"B": 2})
    assert view.costs == {"F": 1, "B": 2, "W": 1}
    assert view.closed_form == ClosedForm("(p-1)/(m+p-1)", "p=4, m=8", 3 / 11)
    assert view.timeline.makespan == 33
    assert view.peak_in_flight == [4, 3, 2, 1]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,mbs", SIZES)
def test_closed_form_bubble_agrees_with_the_time_slots(name, stages, mbs):
    view = builtin(name, stages, mbs).view()
    assert view.closed_form.value == pytest.approx(view.timeline.bubble_fraction)


@pytest.mark.parametrize("stages,mbs,devices,formula", [
    (8, 4, 4, "(p-1)/(v*m+p-1)"), (8, 7, 4, "(p-1)/(v*m+p-1)"), (12, 4, 4, "(p-1)/(v*m+p-1)"),
    (4, 2, 2, "(p-1)/(v*m+p-1)"), (6, 3, 2, "(p-1)/(v*m+p-1)"), (4, 8, 4, "(p-1)/(v*m+p-1)"),
    (8, 2, 4, "(v*(p-m)+m-1)/(v*p+m-1)"), (12, 3, 4, "(v*(p-m)+m-1)/(v*p+m-1)"),
    (8, 1, 4, "(v*(p-m)+m-1)/(v*p+m-1)"), (4, 2, 4, "(v*(p-m)+m-1)/(v*p+m-1)"),
])
@pytest.mark.parametrize("costs", [{}, {"B": 2}])
def test_interleaved_closed_form_agrees_with_the_time_slots(stages, mbs, devices, formula, costs):
    view = interleaved(stages, mbs, devices).view(costs)
    assert view.closed_form.formula == formula
    assert view.closed_form.value == pytest.approx(view.timeline.bubble_fraction)


def test_interleaved_closed_form_is_megatrons():
    """p=4 devices, v=2 stages each, m=4: (4-1)/(2*4+4-1) = 3/11, less than 1F1B's 3/7."""
    assert interleaved(8, 4, 4).view().closed_form == ClosedForm(
        "(p-1)/(v*m+p-1)", "p=4, v=2, m=4", 3 / 11
    )
    assert closed_form_bubble(interleaved(8, 8, 4)).value == pytest.approx(3 / 19)


def test_interleaved_closed_form_only_for_its_own_rows_and_devices():
    rows = interleaved(8, 4, 4).to_rows()
    assert closed_form_bubble(from_lists(rows, name="interleaved")) is not None
    assert closed_form_bubble(from_lists(one_f_one_b(4, 4).to_rows(), name="interleaved")) is None
    assert closed_form_bubble(from_lists(rows[:2], name="interleaved")) is None
    assert closed_form_bubble(from_lists(rows, name="1f1b")) is None


def test_interleaved_peak_in_flight_4_devices_2_stages_each_8_microbatches():
    """Device d warms up with (v-1)*4 + 2*(3-d) = 10, 8, 6, 4 forwards, then runs one more
    forward before its first backward and one forward per backward after that: warm-up + 1.
    1F1B on 4 devices holds 4, 3, 2, 1, each a stage twice the size of one of these."""
    assert peak_in_flight(interleaved(8, 8, 4)) == [11, 9, 7, 5]


def test_gpipe_holds_every_microbatch():
    assert peak_in_flight(gpipe(4, 8)) == [8, 8, 8, 8]


def test_closed_form_only_for_a_builtins_own_rows():
    assert closed_form_bubble(from_table(one_f_one_b(2, 4).table())) is None
    assert closed_form_bubble(from_table(one_f_one_b(2, 4).table(), name="1f1b")) is not None
    assert closed_form_bubble(from_table(gpipe(2, 4).table(), name="1f1b")) is None


def test_weight_gradients_hold_activations_until_w():
    with_w = from_table("0F0 0F1 0B0 0B1 0W0 0W1\n1F0 1B0 1F1 1B1 1W0 1W1")
    assert peak_in_flight(with_w) == [2, 2]
    assert peak_in_flight(from_table("0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1")) == [2, 1]


def test_an_overlap_groups_forward_counts_before_its_backward_releases():
    schedule = from_table("0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1")
    schedule.overlap = [[], [(Action(1, "B", 0), Action(1, "F", 1))]]
    assert peak_in_flight(schedule) == [2, 2]


def test_several_stages_on_a_device_count_each():
    schedule = from_lists([["0F0", "0F1", "3F0", "3B0", "3F1", "3B1", "0B0", "0B1"],
                           ["1F0", "1F1", "2F0", "2B0", "2F1", "2B1", "1B0", "1B1"]])
    assert peak_in_flight(schedule) == [3, 3]


def test_view_text_of_a_user_schedule():
    view = from_lists([["0F0", "0B0"]], name="one").view({"F": 2})
    assert str(view) == """\
schedule one: 1 devices, 1 stages, 1 microbatches

actions per device:
device 0: 0F0 0B0

closed-form bubble: none

idealised time slots (F=2, B=1; communication free):
time     | 0  1  2
device 0 | F0 F0 B0
one: makespan 3, bubble 0.0%

peak in-flight activations (microbatches held for their backward):
device 0: 1
"""


@pytest.mark.parametrize(
    "costs,message",
    [({"X": 1}, "costs: unknown action kind X; give times for F, B and W"),
     ({"W": -1}, "costs: W=-1 is negative")],
)
def test_view_rejects_bad_costs(costs, message):
    with pytest.raises(ScheduleError, match=message):
        gpipe(2, 2).view(costs)


def test_view_validates_first():
    with pytest.raises(ScheduleError, match="action 1B1 is missing"):
        from_table("0F0 0F1 0B0 0B1\n1F0 1B0 1F1").view()


def test_view_svg_is_the_time_slot_picture():
    view = gpipe(2, 2).view()
    assert view.svg() == render_svg(view.timeline)


# ---------------------------------------------------------------- agreement with torch
# torch.distributed.pipelining's single-stage schedules are built here without a process
# group: a stage stand-in that records what the schedule runs and has no peers to talk to.


class _RecordingStage:
    """What ScheduleGPipe / Schedule1F1B read of a pipeline stage; records each action."""

    def __init__(self, stage_index, num_stages):
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_last = stage_index == num_stages - 1
        self.has_backward = False
        self.ran = []

    def get_fwd_recv_ops(self, microbatch):
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops

    def forward_one_chunk(self, microbatch, *args, **kwargs):
        self.ran.append(f"{self.stage_index}F{microbatch}")

    def backward_one_chunk(self, microbatch, **kwargs):
        self.ran.append(f"{self.stage_index}B{microbatch}")

    def clear_runtime_states(self):
        pass

    def perform_reduce_grad(self, scale):
        pass


def _torch_schedule(name, rank, stages, microbatches):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return cls(_RecordingStage(rank, stages), microbatches)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_action_order_is_the_one_torch_runs(name):
    """Each rank's order as torch's own `_step_microbatches` runs it, at pp=4, 8 microbatches."""
    ran = []
    for rank in range(4):
        schedule = _torch_schedule(name, rank, 4, 8)
        schedule._stage_forward_initialized = True  # no shape inference: it talks to peers
        schedule._step_microbatches()
        ran.append(schedule._stage.ran)
    assert ran == builtin(name, 4, 8).to_rows()


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_action_order_against_torchs_pipeline_order_table(name):
    """torch's `pipeline_order` table, at pp=4, 8 microbatches, against piperc's rows.

    Differences, each asserted so that a change on either side shows here:
    - torch ends each rank with `<stage>REDUCE_GRAD`, the gradient reduction over
      microbatches; piperc has no action for it (gradients accumulate in the
      backward tasks and the update task reads them), so it is dropped;
    - 1F1B's last rank: torch's table names its forwards 3F1..3F8 where it runs
      3F0..3F7 (its `_get_pipeline_order` starts the forward counter at 0 and
      increments it before the first forward when a rank has no warm-up
      forward); the order torch runs is piperc's (test above).
    """
    rows = builtin(name, 4, 8).to_rows()
    for rank in range(4):
        table = [str(a) for a in _torch_schedule(name, rank, 4, 8).pipeline_order[rank]]
        assert table[-1] == f"{rank}REDUCE_GRAD"
        if name == "1f1b" and rank == 3:
            table = [
                f"3F{int(a[2:]) - 1}" if a.startswith("3F") else a for a in table[:-1]
            ] + table[-1:]
        assert table[:-1] == rows[rank]


class _InterleavedStage:
    """What ScheduleInterleaved1F1B's constructor reads of one of a rank's stages."""

    def __init__(self, stage_index, num_stages, rank, num_devices):
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group_rank = rank
        self.group_size = num_devices
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.stage_index_to_group_rank = {}
        self.submod = None  # the zero-bubble schedules look for torch.compile'd modules


def _torch_interleaved_order(stages, microbatches, devices, name="ScheduleInterleaved1F1B"):
    """torch's `pipeline_order` for every rank, built from rank 0's stages (loop placement:
    rank 0 holds stages 0, p, 2p, ...; V placement for ZBV and DualPipeV: stages 0 and
    2p - 1; every rank computes the whole table), None (idle) dropped."""
    import torch.distributed.pipelining as pipelining

    cls = getattr(pipelining, name)
    v_placement = name in ("ScheduleZBVZeroBubble", "ScheduleDualPipeV")
    held = [0, stages - 1] if v_placement else range(0, stages, devices)
    local = [_InterleavedStage(s, stages, 0, devices) for s in held]
    order = cls(local, microbatches).pipeline_order
    return [[str(a) for a in order[rank] if a is not None] for rank in range(devices)]


@pytest.mark.parametrize("stages,mbs,devices", [(8, 8, 4), (4, 4, 2), (4, 8, 2), (8, 4, 4),
                                                (8, 6, 4), (8, 3, 4), (12, 8, 4), (4, 8, 4)])
def test_interleaved_is_torchs_pipeline_order(stages, mbs, devices):
    """Identical action for action, with torch's None (idle) slots dropped; at pp=4 x v=2 x 8
    microbatches and pp=2 x v=2 x 4 and 8 microbatches as well as the other shapes. Those
    with m >= 2p fail piperc's rendezvous check (see the deadlock test above)."""
    assert _torch_interleaved_order(stages, mbs, devices) == interleaved(stages, mbs, devices).to_rows()


@pytest.mark.parametrize("stages,mbs,devices", [(8, 9, 4), (4, 5, 2)])
def test_interleaved_refuses_the_microbatch_counts_torch_refuses(stages, mbs, devices):
    with pytest.raises(ValueError, match="multiple of the number of rounds"):
        _torch_interleaved_order(stages, mbs, devices)
    with pytest.raises(ScheduleError, match="do not split evenly into them"):
        interleaved(stages, mbs, devices)


def _in_piperc_terms(torch_row):
    """A torch zero-bubble row in piperc's actions: torch's I (input gradient) is piperc's B;
    a full backward B is piperc's B then its W; an overlapped `(xFm;yBn)OVERLAP_F_B` is the
    overlap group `xFm+yBn` then `yWn`."""
    out = []
    for action in torch_row:
        if action.endswith("OVERLAP_F_B"):
            forward, backward = action[1:action.index(")")].split(";")
            out += [f"{forward}+{backward}", backward.replace("B", "W")]
        elif "B" in action:
            out += [action, action.replace("B", "W")]
        else:
            out.append(action.replace("I", "B"))
    return out


@pytest.mark.parametrize("name,torch_name", [("interleaved-zb", "ScheduleInterleavedZeroBubble"),
                                             ("zbv", "ScheduleZBVZeroBubble"),
                                             ("dualpipev", "ScheduleDualPipeV")])
@pytest.mark.parametrize("devices,mbs", [(4, 8), (2, 4), (4, 16), (3, 6), (2, 8)])
def test_zero_bubble_schedules_are_torchs_pipeline_order(name, torch_name, devices, mbs):
    """interleaved-zb (loop placement), ZB-V and DualPipeV (V placement), two stages per
    device: torch's table action for action, in piperc's terms (`_in_piperc_terms`: torch
    writes B and W together where it does not split them, and an overlapped pair as one
    action). Every one validates: a row that consumes a peer's messages out of the order
    they were sent receives them early, in send order (`receive_plan`)."""
    torch_rows = _torch_interleaved_order(2 * devices, mbs, devices, torch_name)
    schedule = builtin(name, 2 * devices, mbs, num_devices=devices)
    assert [_in_piperc_terms(row) for row in torch_rows] == schedule.grouped_rows()
    validate(schedule)


def test_v_placement_puts_the_first_and_last_stages_on_device_0():
    assert builtin("zbv", 8, 8, num_devices=4).stage_device == {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 2, 6: 1, 7: 0}
    with pytest.raises(ScheduleError, match=r"'zbv' runs two stages per device in V placement .* needs 8 "
                                            r"stages for 4 devices, got 12"):
        builtin("zbv", 12, 8, num_devices=4)
    with pytest.raises(ScheduleError, match="'dualpipev' on 4 devices needs at least 8 microbatches"):
        builtin("dualpipev", 8, 6, num_devices=4)


def test_dualpipev_overlaps_a_forward_with_a_backward_of_the_other_stage():
    schedule = builtin("dualpipev", 4, 4, num_devices=2)
    assert schedule.table() == (
        "device 0: 0F0 0F1 0F2 3F0 3B0 3W0 3F1 0F3+3B1 3W1 3F2+0B0 0W0 3B2 3W2 3F3+0B1 0W1 3B3 3W3 0B2 0W2 0B3 0W3\n"
        "device 1: 1F0 2F0 1F1 2F1 1F2 2B0 2W0 2F2+1B0 1W0 1F3+2B1 2W1 2F3+1B1 1W1 2B2 2W2 1B2 1W2 2B3 1B3 2W3 1W3")
    assert from_table(schedule.table()).overlap == schedule.overlap
    # the overlapped pairs run together under unit costs: less than the rows run in turn
    in_turn = from_lists(schedule.to_rows(), 4, 4)
    assert simulate(schedule, 1, 1, 1).makespan < simulate(in_turn, 1, 1, 1).makespan


def test_zb_h2_fills_the_warm_up_for_the_ideal_step_at_twice_the_memory():
    """Under unit costs ZB-H2 takes 3m + p - 1, the fill alone, holding 2p - 1 microbatches
    on every device (ZB-H1 holds 1F1B's p)."""
    for p, m in [(2, 4), (4, 8), (4, 16), (8, 16)]:
        schedule = builtin("zb-h2", p, m)
        validate(schedule)
        assert simulate(schedule, 1, 1, 1).makespan == 3 * m + p - 1
        assert closed_form_bubble(schedule).value == pytest.approx(simulate(schedule, 1, 1, 1).bubble_fraction)
        assert peak_in_flight(schedule) == [2 * p - 1] * p
        assert simulate(schedule, 1, 1, 1).makespan <= simulate(builtin("zb-h1", p, m), 1, 1, 1).makespan


def test_hanayo_runs_waves_down_and_back_up_the_devices():
    """W = stages / 2p waves: chunk c of p stages runs down the devices when c is even, back
    up when odd, so each turn stays on one device. Under unit costs (F = 1, B = 2) one wave
    at pp=4 leaves more bubble than interleaved's loop placement, two waves nearly as little;
    the waves' turns need no transfer (what the communication-aware comparison rewards)."""
    schedule = builtin("hanayo", 16, 16, num_devices=4)
    assert [schedule.device_of(s) for s in range(16)] == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0]
    assert builtin("hanayo", 4, 4, num_devices=2).table() == (
        "device 0: 0F0 0F1 0F2 3F0 3B0 3F1 3B1 0F3 0B0 0B1 3F2 3B2 3F3 3B3 0B2 0B3\n"
        "device 1: 1F0 2F0 1F1 2F1 1F2 2B0 1B0 2B1 1B1 2F2 1F3 2F3 2B2 1B2 2B3 1B3")
    for stages, mbs, bubble in [(8, 8, 0.262), (8, 16, 0.127), (16, 16, 0.050)]:
        validate(builtin("hanayo", stages, mbs, num_devices=4))
        assert simulate(builtin("hanayo", stages, mbs, num_devices=4)).bubble_fraction == pytest.approx(bubble, abs=1e-3)
    sent = sum(len(ms) for (d, peer), ms in messages(builtin("hanayo", 8, 8, num_devices=4)).items() if d < peer)
    looped = sum(len(ms) for (d, peer), ms in messages(interleaved(8, 8, 4)).items() if d < peer)
    assert sent < looped  # the turn of the wave is local: 6 of 7 boundaries cross devices, not 7
    with pytest.raises(ScheduleError, match="'hanayo' runs waves of 2 x 4 stages .* multiple of 8, got 12"):
        builtin("hanayo", 12, 8, num_devices=4)
