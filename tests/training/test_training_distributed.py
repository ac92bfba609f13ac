"""Multi-process training (torchrun, DDP over gloo on CPU): 2 processes x 16 examples per step (or 2
accumulated micro-batches of 2 x 8) end with the same adapter as 1 process x 32, from the same pruning
mask (rank 0 prunes, the others load it, and all compare pattern digests before training); and a
2-process job killed with SIGKILL resumes to the adapter of a job that never stopped.

The tiny model has no dropout here: with dropout the ranks draw their own masks, so the runs agree in
distribution, not value.
"""

import os
import random
import subprocess
import sys

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from training_support import (
    kill_when_checkpointed,
    sentiment_files,  # noqa: F401
    train_args,
    write_tiny_model,
)

from sparseadapter.adapters.io import weights_path
from sparseadapter.cli import main

safetensors = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

COMMON = (
    "--kind",
    "houlsby",
    "--bottleneck",
    "8",
    "--sparsity",
    "0.5",
    "--pruner",
    "snip",
    "--batch-size",
    "32",
    "--calibration-batches",
    "2",
)
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert-no-dropout"), dropout=0.0)


def torchrun_cmd(argv, nproc=2):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "sparseadapter.cli",
        *argv,
    ]


def torchrun(argv):
    return subprocess.run(torchrun_cmd(argv), capture_output=True, text=True, timeout=300, env=ENV)


def tensors(folder):
    return safetensors.load_file(weights_path(str(folder)))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_processes_match_one(accumulation, no_dropout_model, sentiment_files, tmp_path, capsys):  # noqa: F811
    """With --grad-accumulation 2, each step is 2 micro-batches of 16 (8 per process; DDP reduces once,
    after the second) and must still give one process's update on 32."""
    steps = ("--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "2")
    micro = ("--batch-size", "16", "--grad-accumulation", "2") if accumulation == 2 else ()
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(train_args(no_dropout_model, sentiment_files, single, *COMMON, *steps)) == 0, capsys.readouterr().err
    proc = torchrun(train_args(no_dropout_model, sentiment_files, double, *COMMON, *steps, *micro))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("SparseAdapter:") == 1, "only rank 0 reports"
    assert "2 processes" in proc.stdout

    a, b = tensors(single / "checkpoint" / "adapter"), tensors(double / "checkpoint" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        if "indices" in key:
            assert torch.equal(a[key], b[key]), f"{key}: the pruning pattern differs"
        else:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    state = torch.load(double / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 6 and len(state["rng"]) == 2


def test_killed_two_process_job_resumes(no_dropout_model, sentiment_files, tmp_path):  # noqa: F811
    steps = ("--max-steps", "90", "--eval-every", "30", "--checkpoint-every", "3")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = torchrun(train_args(no_dropout_model, sentiment_files, straight, *COMMON, *steps))
    assert proc.returncode == 0, proc.stderr[-3000:]

    stop = random.Random(8).randrange(6, 45)  # far from the end: the job must not finish between poll and kill
    left = kill_when_checkpointed(
        torchrun_cmd(train_args(no_dropout_model, sentiment_files, killed, *COMMON, *steps)), killed, stop, env=ENV
    )
    assert 0 < left < 90, f"killed at checkpoint step {left}"
    proc = torchrun(train_args(no_dropout_model, sentiment_files, killed, *COMMON, *steps, "--resume"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"from step {left} of 90" in proc.stdout, proc.stdout

    a, b = tensors(straight / "adapter"), tensors(killed / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


FSDP_SCRIPT = """
import os, sys, warnings
import torch, torch.distributed as dist
from torch import nn
import sparseadapter as sa
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

warnings.filterwarnings("ignore")
dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
sa.prune(model, "magnitude", 0.5, targets=["0", "2"])
x = torch.randn(6, 16)
model(x).sum().backward()
want_out = model(x).detach()
want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
buffers = {n: b.clone() for n, b in model.named_buffers()}
model.zero_grad()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
out = model(x)
out.sum().backward()
torch.testing.assert_close(out, want_out)
for n, p in model.named_parameters():  # every rank saw the same x: the averaged gradient is the gradient
    torch.testing.assert_close(p.grad.full_tensor(), want_grads[n], msg=n)
for n, b in model.named_buffers():
    assert torch.equal(b, buffers[n]), n
print("rank", dist.get_rank(), "fsdp2 ok", flush=True)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # see sparseadapter.cli.main: gloo's teardown at interpreter exit can abort
"""


def test_fsdp2_shards_values_and_keeps_csr_buffers(tmp_path):
    """FSDP2 (fully_shard) shards a SparseLinear's values (a 1-D parameter) and leaves the CSR index
    buffers whole: forward and backward match the unsharded layer."""
    fully_shard = pytest.importorskip("torch.distributed.fsdp").__dict__.get("fully_shard")
    if fully_shard is None:
        pytest.skip("this torch has no FSDP2 fully_shard")
    script = tmp_path / "fsdp_check.py"
    script.write_text(FSDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("fsdp2 ok") == 2
