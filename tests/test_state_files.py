"""Client state files (skyfed.runtime.state_files): the whole tree comes back equal."""

import torch

from skyfed.runtime.state_files import load_state, save_state


def test_state_round_trip_keeps_every_leaf(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "trainer": {
            "optimizer": {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 5), "exp_avg_sq": torch.rand(4, 5)}},
                "param_groups": [{"lr": 0.002, "betas": (0.9, 0.95), "params": [0], "amsgrad": False}],
            },
            "step": 7,
        },
        "residual": None,
        "downlink": {"held": {"w": base, "w_view": base[2:6], "half": torch.ones(3, dtype=torch.bfloat16)}, "tag": 2},
    }
    path = str(tmp_path / "c.0.safetensors")
    save_state(state, path)
    back = load_state(path)
    assert back["trainer"]["optimizer"]["state"].keys() == {0}  # int keys stay ints
    assert back["trainer"]["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["trainer"]["step"] == 7 and back["residual"] is None and back["downlink"]["tag"] == 2
    for k in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(back["trainer"]["optimizer"]["state"][0][k], state["trainer"]["optimizer"]["state"][0][k])
    held = back["downlink"]["held"]
    assert torch.equal(held["w"], base) and torch.equal(held["w_view"], base[2:6])  # a view of a saved tensor
    assert held["half"].dtype == torch.bfloat16 and torch.equal(held["half"], torch.ones(3, dtype=torch.bfloat16))
    held["w"] += 1  # the loaded tensors are the caller's own
    assert torch.equal(load_state(path)["downlink"]["held"]["w"], base)
    assert not list(tmp_path.glob("*.tmp*"))  # the write was atomic
