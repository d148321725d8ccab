"""The Ray runtime resumes exactly, with the clients' state in the object store or on disk."""

import pytest
from ray_harness import Stop, assert_same, run_smoke, shared_ray  # noqa: F401

from skyfed.federation.checkpoint import load_checkpoint

pytestmark = pytest.mark.processes


@pytest.mark.parametrize("where", ["object_store", "disk"])
def test_ray_resume_is_exact(tmp_path, shared_ray, where):  # noqa: F811
    extra = ["runtime=ray", f"ray.client_state={where}", "federation.rounds=3",
             "compression.uplink=[int8]", "compression.downlink=[int8]"]
    whole = run_smoke(tmp_path, "whole", extra)

    def stop(kind, data):
        if kind == "round_end" and data["round"] == 1:  # after round 1's checkpoint
            raise Stop()

    with pytest.raises(Stop):
        run_smoke(tmp_path, "cut", extra, on_event=stop)
    if where == "disk":  # the checkpoint of round 1 names generation-2 files; round 0's are kept too
        _, saved = load_checkpoint(tmp_path / "cut" / "checkpoint")
        assert saved["parts"]["transport"]["client_files"] == {n: f"{n}.2.safetensors" for n in ("aws", "gcp", "azure")}
        files = sorted(p.name for p in (tmp_path / "cut" / "clients").iterdir() if p.is_file())
        # one file a state: the smoke model is below ClientReplica's threshold for writing parts apart
        assert files == sorted(f"{n}.{g}.safetensors" for n in ("aws", "gcp", "azure") for g in (1, 2))
    assert_same(whole, run_smoke(tmp_path, "cut", extra, resume=True))
