"""Workers keep freed memory (handlers/allocator.py): measured by the page faults a batched CNN takes per forward."""

import subprocess
import sys

import pytest

from archiver.package.archive import model_config
from archiver.spec import ServingSpec
from handlers.allocator import freed_memory_wanted, keep_freed_memory
from handlers.spec import parse

# A ResNet stem and two basic blocks at batch 8, 224x224: a 25 MB activation and several of 6 MB, the mix of
# sizes that glibc's adaptive thresholds keep handing back to the OS (~12,500 faults per forward measured here).
FAULTS_PER_FORWARD = """
import resource, sys, torch
from handlers.allocator import keep_freed_memory
torch.set_num_threads(1)
kept = sys.argv[1] == "keep" and keep_freed_memory()
nn = torch.nn
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))
net = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(3, 2, 1), Block(), Block(),
                    nn.AdaptiveAvgPool2d(1)).eval()
x = torch.randn(8, 3, 224, 224)
with torch.inference_mode():
    for _ in range(3):
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_forward(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_FORWARD, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_a_worker_that_keeps_freed_memory_takes_no_page_faults_per_batch():
    kept, faults_kept = faults_per_forward("keep")
    _, faults_default = faults_per_forward("default")
    assert kept
    assert faults_default > 1000  # glibc's own thresholds fault in fresh pages on every forward
    assert faults_kept < faults_default / 20


def test_keep_freed_memory_is_on_unless_the_archive_says_false():
    assert freed_memory_wanted({}) and freed_memory_wanted({"keep_freed_memory": True})
    assert not freed_memory_wanted({"keep_freed_memory": False})
    assert "keep_freed_memory" not in model_config(parse(ServingSpec, {"batch_size": 8})).get("handler", {})
    off = model_config(parse(ServingSpec, {"batch_size": 8, "keep_freed_memory": False}))
    assert off["handler"]["keep_freed_memory"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_reports_whether_glibc_took_it():
    assert keep_freed_memory() is True
