"""Converted models under DDP (2 processes, gloo), torch.compile, bf16 autocast, double backward."""

import copy
import os
import socket
import warnings

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qbackprop as qb


def _tiny(name="test_efficientnet"):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qb.convert_model(model, "2bit-stochastic")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_tiny())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 5, (4,), generator=gen)
        torch.manual_seed(rank)  # and draws different stochastic rounding noise
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(flat, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_keep_parameters_identical(tmp_path):
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    initial = torch.cat([p.detach().flatten() for p in _tiny().parameters()])
    assert torch.equal(a, b)
    assert not torch.equal(a, initial)  # the step did something


def test_torch_compile_runs_forward_and_backward():
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        BatchNormAct2d(8, act_layer=torch.nn.SiLU),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.BatchNorm2d(8),
        torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    qb.convert_model(model, "2bit-stochastic")
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 16, 16)
    out = compiled(x)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_autocast_on_cpu_matches_plain_autocast_forward():
    model = _tiny()
    plain = copy.deepcopy(model)
    qb.revert_model(plain)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        ref = plain(x)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=0, rtol=0)
    out.float().square().mean().backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()


def test_double_backward_raises_clear_error():
    model = _tiny()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward|differentiate twice"):
        (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        gx.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_training_step(dtype):
    model = _tiny().cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        loss = model(x).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_import_does_not_touch_cuda():
    import subprocess
    import sys

    code = "import qbackprop, torch; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
