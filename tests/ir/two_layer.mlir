"builtin.module"() ({
  "func.func"() <{function_type = (!torch.vtensor<[3,4],f32>, !torch.vtensor<[8,4],f32>, !torch.vtensor<[2,8],f32>) -> !torch.vtensor<[3,2],f32>, sym_name = "main"}> ({
  ^bb0(%arg0: !torch.vtensor<[3,4],f32>, %arg1: !torch.vtensor<[8,4],f32>, %arg2: !torch.vtensor<[2,8],f32>):
    %0 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
    %1 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
    %2 = "torch.prim.ListConstruct"(%0, %1) : (!torch.int, !torch.int) -> !torch.list<int>
    %3 = "torch.aten.permute"(%arg1, %2) : (!torch.vtensor<[8,4],f32>, !torch.list<int>) -> !torch.vtensor<[4,8],f32>
    %4 = "torch.aten.mm"(%arg0, %3) : (!torch.vtensor<[3,4],f32>, !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[3,8],f32>
    %5 = "torch.aten.relu"(%4) : (!torch.vtensor<[3,8],f32>) -> !torch.vtensor<[3,8],f32>
    %6 = "torch.aten.detach"(%5) : (!torch.vtensor<[3,8],f32>) -> !torch.vtensor<[3,8],f32>
    %7 = "torch.constant.int"() <{value = 1 : i64}> : () -> !torch.int
    %8 = "torch.constant.int"() <{value = 0 : i64}> : () -> !torch.int
    %9 = "torch.prim.ListConstruct"(%7, %8) : (!torch.int, !torch.int) -> !torch.list<int>
    %10 = "torch.aten.permute"(%arg2, %9) : (!torch.vtensor<[2,8],f32>, !torch.list<int>) -> !torch.vtensor<[8,2],f32>
    %11 = "torch.aten.mm"(%6, %10) : (!torch.vtensor<[3,8],f32>, !torch.vtensor<[8,2],f32>) -> !torch.vtensor<[3,2],f32>
    %12 = "torch.aten.detach"(%11) : (!torch.vtensor<[3,2],f32>) -> !torch.vtensor<[3,2],f32>
    "func.return"(%12) : (!torch.vtensor<[3,2],f32>) -> ()
  }) : () -> ()
}) : () -> ()
