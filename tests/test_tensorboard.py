"""A real TensorBoard server, asked over HTTP for what a user would look at."""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port, summary


@pytest.fixture
def server(default_run):
    cwd, _ = default_run
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(cwd / "lightning_logs"),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    def get(path, body=None):
        request = urllib.request.Request(base + path, data=body and json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 90
        while True:  # the server answers before it has read the event files
            try:
                if "val_loss" in get("/data/plugin/scalars/tags").get("version_0", {}):
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "tensorboard did not come up"
            time.sleep(0.5)
        yield get, cwd / "lightning_logs" / "version_0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_serves_curves_images_text_and_hparams(server):
    get, run = server
    s = summary(run)
    tags = get("/data/plugin/scalars/tags")["version_0"]
    for tag in ("train_loss", "train_loss_epoch", "val_loss", "val_acc", "lr-Adam", "train_samples_per_second",
                "best_val_loss", "best_val_acc"):
        assert tag in tags, tag
    val_acc = get("/data/plugin/scalars/scalars?run=version_0&tag=val_acc")
    assert len(val_acc) == s["epochs"]
    lrs = get("/data/plugin/scalars/scalars?run=version_0&tag=lr-Adam")
    assert lrs[0][2] == pytest.approx(s["lr"])
    assert "lr_finder" in get("/data/plugin/images/tags")["version_0"]
    assert "batch_size_search/text_summary" in get("/data/plugin/text/tags")["version_0"]
    experiment = get("/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = {h["name"] for h in experiment["hparamInfos"]}
    assert {"batch_size", "lr", "features", "hidden", "seed", "precision"} <= hparams
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"best_val_loss", "best_val_acc"} <= metrics
    best = get("/data/plugin/scalars/scalars?run=version_0&tag=best_val_acc")
    assert best[-1][2] == pytest.approx(s["best_val_acc"])
