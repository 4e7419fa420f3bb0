import os
import platform
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

import train
from conftest import TINY
from train import SumSignDataModule, SumSignModel, SumSignRows


def test_labels_say_whether_the_features_sum_above_zero():
    data = SumSignRows(3000, 32, (0, "train"), stored=True)
    x, y = data[torch.arange(len(data))]
    assert x.shape == (3000, 32) and y.shape == (3000,)
    assert x.min() > -1 and x.max() < 1
    assert torch.equal(y, (x.double().sum(1) > 0).float())
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < y.mean() < 0.6
    # uniform on the 256 points (2k + 1) / 256 of (-1, 1): mean 0, variance (1 - 1/256**2) / 3
    assert abs(x.mean()) < 0.01 and len(x.unique()) == 256
    assert x.var().item() == pytest.approx((1 - 1 / 256**2) / 3, rel=0.02)


def test_batch_fetch_matches_single_rows():
    data = SumSignRows(100, 16, (1, "val"), stored=True)
    xb, yb = data[torch.tensor([5, 0, 99])]
    for row, i in enumerate([5, 0, 99]):
        x, y = data[torch.tensor([i])]
        assert torch.equal(xb[row], x[0]) and yb[row] == y[0]


def test_each_split_is_a_pure_function_of_its_key():
    a = SumSignRows(500, 24, (7, "train"), stored=True)
    b = SumSignRows(500, 24, (7, "train"), stored=True)
    assert torch.equal(a.codes, b.codes)
    torch.manual_seed(123)  # the global RNG has no say
    c = SumSignRows(500, 24, (7, "train"), stored=True)
    assert torch.equal(a.codes, c.codes)
    val = SumSignRows(500, 24, (7, "val"), stored=True)
    other_seed = SumSignRows(500, 24, (8, "train"), stored=True)
    assert not torch.equal(a.codes, val.codes)
    assert not torch.equal(a.codes, other_seed.codes)
    # a shorter split is a prefix of a longer one drawn with the same key
    assert torch.equal(SumSignRows(300, 24, (7, "train"), stored=True).codes, a.codes[:300])
    # drawn when asked for, a batch is the same rows as stored
    x, y = SumSignRows(500, 24, (7, "train"))[0:200]
    assert torch.equal(x, a[torch.arange(200)][0]) and torch.equal(y, a[torch.arange(200)][1])


def datamodule_at(epoch, fresh_data, rank=0, world_size=1, samples=1000, batch_size=64, precision="32-true"):
    """The DataModule as Lightning drives it, for one epoch on one rank, without a Trainer."""
    dm = SumSignDataModule(samples, 300, 20, seed=3, batch_size=batch_size, fixed_data=not fresh_data)
    dm.trainer = SimpleNamespace(current_epoch=epoch, global_rank=rank, world_size=world_size, precision=precision,
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("fit")
    return dm


def epoch_rows(dm) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(dm.train_dataloader())
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def row_set(x: torch.Tensor) -> set:
    return {tuple(row) for row in x.tolist()}


def test_fresh_data_is_new_every_epoch_and_the_same_on_every_rerun():
    x0, y0 = epoch_rows(datamodule_at(0, fresh_data=True))
    x1, _ = epoch_rows(datamodule_at(1, fresh_data=True))
    assert x0.shape == (1000, 20) and torch.equal(y0, (x0.double().sum(1) > 0).float())
    assert torch.equal(x0, epoch_rows(datamodule_at(0, fresh_data=True))[0])  # a rerun, a resume
    assert not row_set(x0) & row_set(x1)
    val = datamodule_at(0, fresh_data=True)
    x_val = torch.cat([x for x, _ in val.val_dataloader()])
    assert torch.equal(x_val, val.val_set[torch.arange(300)][0])  # fixed, in order
    assert not row_set(x_val) & (row_set(x0) | row_set(x1))
    assert datamodule_at(0, fresh_data=True).train_set is None  # nothing stored


@pytest.mark.parametrize("fresh_data", [False, True], ids=["fixed", "fresh"])
def test_ranks_draw_disjoint_shards_of_equal_length(fresh_data):
    shards = [epoch_rows(datamodule_at(2, fresh_data, rank, world_size=3, samples=1000))[0] for rank in range(3)]
    assert [len(s) for s in shards] == [334] * 3  # 1000 rows padded to 1002, as DistributedSampler does
    rows = [row_set(s) for s in shards]
    shared = len(rows[0] & rows[1]) + len(rows[0] & rows[2]) + len(rows[1] & rows[2])
    if fresh_data:
        assert shared == 0
    else:  # together the whole set; only the 2 padding rows repeat rows of another rank
        assert set().union(*rows) == row_set(datamodule_at(2, False).train_set[torch.arange(1000)][0])
        assert shared <= 2


@pytest.mark.parametrize("fresh_data", [False, True], ids=["fixed", "fresh"])
@pytest.mark.parametrize("precision,dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_batches_come_exactly_in_the_matmul_type(fresh_data, precision, dtype):
    x32, y32 = epoch_rows(datamodule_at(1, fresh_data))
    x, y = epoch_rows(datamodule_at(1, fresh_data, precision=precision))
    assert x.dtype == dtype and torch.equal(x.float(), x32) and torch.equal(y, y32)


def test_fixed_set_is_shuffled_by_epoch_alone():
    x0, _ = epoch_rows(datamodule_at(0, fresh_data=False))
    x1, _ = epoch_rows(datamodule_at(1, fresh_data=False))
    assert row_set(x0) == row_set(x1) and not torch.equal(x0, x1)
    assert torch.equal(x1, epoch_rows(datamodule_at(1, fresh_data=False))[0])


def test_model_shapes_and_outputs():
    model = SumSignModel(features=40, hidden=8, lr=1e-3, batch_size=4)
    assert model.hidden.weight.shape == (8, 40) and model.out.weight.shape == (1, 8)
    assert model.hparams.lr == 1e-3 and model.hparams.batch_size == 4
    x = torch.rand(4, 40) * 2 - 1
    p = model(x)
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()
    assert torch.allclose(p, torch.sigmoid(model.logits(x)))
    # both layers are linear: the network is one affine map
    w = (model.out.weight @ model.hidden.weight).squeeze(0)
    b = model.out.weight @ model.hidden.bias + model.out.bias
    assert torch.allclose(model.logits(x), x @ w + b, atol=1e-5)


@pytest.mark.parametrize("precision,logits,labels", [
    ("32-true", [0.25, 0.25, 0.25], [1.0, 1.0, 0.0]),  # all within [0, 1]: taken for probabilities below 0.5
    ("bf16-true", [0.001, -5.0], [1.0, 0.0]),  # the sigmoid of 0.001 in bf16 is exactly 0.5: a negative
], ids=["logits-within-0-1", "small-logit-in-bf16"])
def test_val_acc_counts_a_positive_logit_as_a_positive_prediction(precision, logits, labels):
    model = SumSignModel(features=2, hidden=2)
    with torch.no_grad():  # logit = the row's first value
        model.hidden.weight.copy_(torch.eye(2))
        model.hidden.bias.zero_()
        model.out.weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.out.bias.zero_()
    x, y = torch.tensor([[logit, 0.0] for logit in logits]), torch.tensor(labels)
    trainer = pl.Trainer(precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (metrics,) = trainer.validate(model, dataloaders=DataLoader([(x, y)], batch_size=None), verbose=False)
    assert metrics["val_acc"] == pytest.approx(((torch.tensor(logits) > 0).float() == y).float().mean().item())


def test_training_loss_is_finite_where_sigmoid_saturates():
    model = SumSignModel(features=4, hidden=2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e2)
    x, y = torch.ones(2, 4), torch.tensor([0.0, 1.0])
    assert model(x).tolist() == [1.0, 1.0]  # logit 100100: sigmoid has saturated, BCE on it would take log(0)
    model.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    loss = model.training_step((x, y), 0)
    assert loss.item() == pytest.approx(100100 / 2)  # the row labelled 0 costs its whole logit


class ScalarReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense: what .item(), bool() and a tensor given as a Python number run.
    On a GPU each one waits for the device; on the CPU they are counted all the same."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_the_average_is_the_polynomial_decay_one_and_reads_nothing_back_from_the_device():
    model, averaging, gamma = SumSignModel(features=8, hidden=4), train.IterateAveraging(), train.AVERAGING_GAMMA
    averaging.setup(None, model, "fit")
    expected = None
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        current = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        expected = current if expected is None else expected + (gamma + 1) / (step + gamma) * (current - expected)
        with ScalarReads() as reads:
            averaging.on_train_batch_end(SimpleNamespace(global_step=step), model, None, None, step - 1)
        assert reads.count == 0  # no host synchronisation a step on a GPU
    average = torch.cat([p.double().flatten() for p in averaging.averaged_state_dict().values()])
    assert torch.allclose(average, expected, atol=1e-6) and int(averaging._average_model.n_averaged) == 5



AVX2_EPYC = {"architecture": "x86_64", "avx2": True, "sse4a": True}  # bf16 would be emulated
ZEN_4 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": True, "sse4a": True}  # and Zen 5
XEON_AMX = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True}
XEON = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True}  # AVX512_BF16 without AMX: bf16 no faster
ARM = {"architecture": "arm64", "neon": True, "bf16": True}  # Apple silicon or Graviton: not measured


@pytest.mark.parametrize("cpu,precision", [(AVX2_EPYC, "32-true"), (ZEN_4, "bf16-mixed"), (XEON_AMX, "bf16-mixed"),
                                           (XEON, "32-true"), (ARM, "32-true")],
                         ids=["avx2-epyc", "zen-4", "xeon-amx", "xeon", "arm"])
def test_auto_precision_follows_the_cpu(cpu, precision, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu)
    assert train.auto_precision("cpu")[0] == precision
    assert train.auto_precision("mps")[0] == "32-true"


@pytest.mark.parametrize("cpu,argv,slower", [
    (AVX2_EPYC, ["--precision", "bf16-mixed"], ("~9x", "no bf16 units: torch emulates them")),
    (AVX2_EPYC, ["--precision", "bf16-true"], ("~9x", "no bf16 units: torch emulates them")),
    (AVX2_EPYC, ["--precision", "32-true"], None),
    (XEON, ["--precision", "bf16-mixed"], ("~1.5x", "AVX512_BF16 without AMX")),
    (ZEN_4, ["--precision", "bf16-mixed"], None),
    (ARM, ["--precision", "bf16-mixed"], None),  # not measured: nothing claimed
], ids=["avx2-epyc-bf16-mixed", "avx2-epyc-bf16-true", "avx2-epyc-32-true", "xeon", "zen-4", "arm"])
def test_bf16_asked_for_on_a_cpu_where_it_is_slower_says_so(cpu, argv, slower, workdir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu)
    args = train.parse_args([*TINY, *argv])
    assert args.precision == argv[1]
    assert args.precision_reason == "--precision" + (
        "; on this CPU bf16 matmuls take {} the time of 32-true's ({})".format(*slower) if slower else "")


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or platform.machine() != "x86_64", reason="Linux on x86")
def test_torch_s_view_of_this_cpu_agrees_with_the_kernel_s(monkeypatch):
    # The rule was measured with the kernel's flags and vendor; torch's query must name the same units.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with open("/proc/cpuinfo") as cpuinfo:
        kernel = {word for line in cpuinfo if line.startswith(("flags", "vendor_id"))
                  for word in line.split(":", 1)[1].split()}
    cpu = torch.cpu.get_capabilities()
    assert (cpu.get("amx_bf16"), cpu.get("avx512_bf16")) == ("amx_bf16" in kernel, "avx512_bf16" in kernel)
    assert cpu.get("sse4a") == ("AuthenticAMD" in kernel)
    fast = "amx_bf16" in kernel or {"avx512_bf16", "AuthenticAMD"} <= kernel
    assert train.auto_precision("cpu")[0] == ("bf16-mixed" if fast else "32-true")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_gpu(native, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert train.auto_precision("gpu")[0] == ("bf16-mixed" if native else "32-true")


@pytest.mark.parametrize("start", [512, 16], ids=["start-above-the-bound", "start-below-it"])
def test_the_batch_size_search_returns_a_size_that_ran(workdir, monkeypatch, start):
    # 4000 rows and >= 64 steps an epoch bound the batch at 62: searched from 62 alone, or 16 then 32.
    sizes = []
    step = SumSignModel.training_step

    def recording_step(self, batch, batch_idx):
        sizes.append(len(batch[0]))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SumSignModel, "training_step", recording_step)
    args = train.parse_args([*TINY, "--batch-size", str(start), "--no-lr-find"])
    model = SumSignModel(32, 64, args.lr, args.batch_size)
    datamodule = SumSignDataModule(4000, 500, 32, seed=42, batch_size=args.batch_size)
    tuned = train.tune(args, model, datamodule, TensorBoardLogger(str(workdir), name=""), 1, SimpleNamespace())
    assert tuned["batch_size"] == (62 if start == 512 else 32)
    assert sorted(set(sizes)) == ([62] if start == 512 else [16, 32])  # every size it tried, and no other
