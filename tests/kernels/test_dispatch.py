import pytest
import torch

from firm import kernels
from firm.kernels import _common
from firm.kernels._common import elementwise_config, reduction_config, use_triton


def test_cpu_uses_reference_unless_interpreter(monkeypatch):
    monkeypatch.delenv("FIRM_KERNELS", raising=False)
    assert use_triton(torch.device("cpu")) is _common.INTERPRETER
    monkeypatch.setenv("FIRM_KERNELS", "torch")
    assert use_triton(torch.device("cpu")) is False
    assert use_triton(torch.device("cuda")) is False


def test_bad_setting_and_impossible_force(monkeypatch):
    monkeypatch.setenv("FIRM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FIRM_KERNELS='cuda' is not one of"):
        kernels.group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
    if not _common.INTERPRETER:
        monkeypatch.setenv("FIRM_KERNELS", "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.step_log_prob(*[torch.zeros(1, 2)] * 3, *[torch.ones(1)] * 3)


@pytest.mark.parametrize("rows, d", [(1, 1), (1, 65536), (64, 65536), (3, 385), (64, 262144), (2, 5000)])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_launch_configs_cover_rows(rows, d, device, monkeypatch):
    monkeypatch.setattr(_common, "_num_sms", lambda dev: 132)  # an H100, without needing one
    cfg = reduction_config(rows, d, torch.device(device))
    assert cfg.chunk % cfg.block == 0 and cfg.n_chunks * cfg.chunk >= d > (cfg.n_chunks - 1) * cfg.chunk
    ew = elementwise_config(d, torch.device(device))
    assert ew.n_chunks * ew.block >= d
    if device == "cuda" and rows * d >= 4 * 132 * cfg.block:
        assert cfg.n_chunks * rows >= 2 * 132  # enough programs to fill the GPU even for small B
