"""The GPU check runs end to end at tiny sizes on CPU (``--smoke``): every part but the CUDA-only figures."""

import json
import math

from fvq.bench.gpu import main


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_smoke_run_writes_every_part(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["smoke"] and not data["errors"], data["errors"]
    parts = data["parts"]
    assert parts["environment"]["device"] == "cpu"
    cases = parts["tokenizer"]
    assert [c["channels_last"] for c in cases] == [False, True]
    for c in cases:
        for key in ("images_per_s", "step_ms", "data_wait_ms_per_step", "peak_memory_mib", "bridge_share"):
            assert _finite(c[key]), (key, c[key])
        assert c["skipped_steps"] == 0 and isinstance(c["host_reads"], int)
    search = parts["search"]["fp32"]
    assert _finite(search["gflops"]) and search["same_indices_as_fp32"] == 1.0
    (gpt,) = parts["generator"]
    assert _finite(gpt["tokens_per_s"]) and _finite(gpt["model_tflops"]) and gpt["skipped_steps"] == 0
    (sampling,) = parts["sampling"]
    assert _finite(sampling["sampling_s"]) and _finite(sampling["decode_s"])
    assert set(data["host_syncs_per_step"]) == {
        "fvq_16k_imagenet channels_last=False compile=False",
        "fvq_16k_imagenet channels_last=True compile=False",
    }
    assert "| tokenizer step |" in capsys.readouterr().out
