"""The split deployment of scripts/serve.sh on a real TorchServe (README "Deployment"): one archive
registered twice, NAME (predictions) and NAME_explain (explanations), own worker and queue each, with
KRYPTON_EXPLAIN_SUFFIX=_explain set as serve.sh sets it. Functional only; the latency it buys is measured
by scripts/bench_isolation.py (bench/results/isolation-*.md), not here."""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import archive_models  # noqa: E402
from server_utils import TINY_MODEL, TorchServeProcess, image_bytes  # noqa: E402

CONFIG = {
    "minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 5, "responseTimeout": 120,
    "handler": {"arch": "tinynet", "seed": 0, "explain_threads": 1,
                "preprocess": {"resize": 40, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                "limits": {"max_positions": 200, "max_request_seconds": 60},
                "defaults": {"patch_size": 8, "stride": 4}},
}


def test_split_registrations_serve_predictions_and_explanations_apart(tmp_path, monkeypatch):
    model_py = tmp_path / "tiny_model.py"
    model_py.write_text(TINY_MODEL)
    store = str(tmp_path / "store")
    archive_models.build_mar("tiny", str(model_py), CONFIG, store, str(tmp_path / "build"))
    monkeypatch.setenv("KRYPTON_EXPLAIN_SUFFIX", "_explain")
    load = "tiny=tiny.mar,tiny_explain=tiny.mar"
    img = image_bytes(64, 50, seed=3)
    jpeg = {"Content-Type": "image/jpeg"}
    with TorchServeProcess(store, ["tiny", "tiny_explain"], str(tmp_path), extra_config={"load_models": load}) as ts:
        pids = {m: ts.worker_pids(m) for m in ("tiny", "tiny_explain")}
        assert len(pids["tiny"]) == len(pids["tiny_explain"]) == 1 and pids["tiny"] != pids["tiny_explain"]

        status, _, body = ts.request("POST", "/predictions/tiny", img, jpeg)
        assert status == 200 and len(json.loads(body)["predictions"]) == 5

        for path in ("/explanations/tiny", "/v1/models/tiny:explain"):
            status, headers, body = ts.request("POST", path, img, jpeg)
            err = json.loads(body)
            assert status == 404 and headers["content-type"].startswith("application/json"), body
            assert "/explanations/tiny_explain" in err["message"] and "predictions only" in err["message"]

        status, _, body = ts.request("POST", "/explanations/tiny_explain", img, jpeg)
        r = json.loads(body)
        assert status == 200 and r["model"] == "tiny_explain" and r["positions"] == 49
        assert r["region"]["original_size"] == [64, 50]
        status, _, body = ts.request("POST", "/predictions/tiny_explain", img, jpeg)  # allowed, same model
        assert status == 200

        with open(os.path.join(ts.log_dir, "model_log.log"), errors="replace") as f:
            log = f.read()
    # the explain worker runs explain_threads torch threads; the prediction worker skips the warm-up plan
    assert "model tiny_explain (explain): " in log and "threads=1 " in log.split("model tiny_explain (explain): ")[1]
    assert "model tiny (predict): " in log
    assert "model tiny: warm-up plan" not in log and "model tiny_explain: warm-up plan" in log
