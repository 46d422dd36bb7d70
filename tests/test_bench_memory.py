"""benchmarks.memory: distinct storages autograd saves, against hand counts (torch 2.13)."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

from benchmarks import memory
from benchmarks.records import read_rows

F32 = 4


def small_model() -> nn.Sequential:
    """conv 3->4 k3 (no bias) -> BN(4) -> SiLU -> flatten -> linear 100 -> 7, on [N, 3, 5, 5]."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 7))


# What each op saves (torch 2.13; test_hand_count_matches_autograd_nodes checks it):
#   ConvolutionBackward0:     input x [N,3,5,5], weight (Parameter)
#   NativeBatchNormBackward0: input (conv out) [N,4,5,5], weight (Parameter), running_mean, running_var
#                             (buffers), result1/result2 = batch mean and inverse std [4] each
#   SiluBackward0:            self (BN out) [N,4,5,5]
#   AddmmBackward0:           mat1 (flattened SiLU out: a view of its storage) [N,100], mat2 = weight.t()
#                             (a view of the Parameter); the BN and linear biases are not saved
HAND_SAVED = {
    "ConvolutionBackward0": {"input", "weight"},
    "NativeBatchNormBackward0": {"input", "weight", "running_mean", "running_var", "result1", "result2"},
    "SiluBackward0": {"self"},
    "AddmmBackward0": {"mat1", "mat2"},
}


def hand_activation_bytes(n: int) -> int:
    per_image = (3 * 25 + 4 * 25 + 4 * 25 + 4 * 25) * F32  # x, conv out, BN out, SiLU out = 1500
    return n * per_image + 2 * 4 * F32  # + BN batch mean and inverse std


HAND_CONSTANT_BYTES = (4 * 3 * 3 * 3 + 4 + 100 * 7) * F32 + 2 * 4 * F32  # conv w, BN w, linear w; running stats


def test_hand_count_matches_autograd_nodes():
    model = small_model().train()
    out = model(torch.randn(2, 3, 5, 5))
    saved = {}
    for node in memory._nodes(out):
        names = {a[len("_saved_"):] for a in dir(node)
                 if a.startswith("_saved_") and isinstance(getattr(node, a), torch.Tensor)}
        if names:
            saved[type(node).__name__] = names
    assert saved == HAND_SAVED


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_small_model_exact_bytes(device):
    model = small_model().to(device)
    got = memory.saved_bytes(model, torch.zeros(2, 3, 5, 5, device=device))
    assert got.activation_bytes == hand_activation_bytes(2) == 3032
    assert got.constant_bytes == HAND_CONSTANT_BYTES == 3280
    assert got.total_bytes == 3032 + 3280
    assert (got.activation_storages, got.constant_storages, got.saved_tensors) == (6, 5, 11)
    assert got.custom_nodes == got.ctx_attr_bytes == got.checkpoint_regions == 0


def test_meta_matches_cpu_on_an_efficientnet_block_stack():
    from effnet_kernels import models

    counts = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            model = models.efficientnet("b0", num_classes=10)
        counts.append(memory.saved_bytes(model, torch.zeros(2, 3, 32, 32, device=device)))
    assert counts[0] == counts[1]
    assert counts[0].activation_bytes > 0


def test_batch_slope_and_fixed_bytes():
    model = small_model()
    per = memory.saved_bytes_per_image(model, lambda n: torch.zeros(n, 3, 5, 5), 3)
    assert per.at_batch.activation_bytes == hand_activation_bytes(3)
    assert per.at_double.activation_bytes == hand_activation_bytes(6)
    assert per.activation_bytes_per_image == 1500
    assert per.fixed_activation_bytes == 32
    assert per.total_bytes_per_image == (hand_activation_bytes(3) + HAND_CONSTANT_BYTES) / 3
    with pytest.raises(ValueError):
        memory.saved_bytes_per_image(model, lambda n: torch.zeros(n, 3, 5, 5), 0)


class SinPlusCos(nn.Module):
    """``sin(x) + cos(x)``: both ops save x."""

    def forward(self, x):
        return x.sin() + x.cos()


class HalvesSinCos(nn.Module):
    """``cat(sin(x[:, :2]), cos(x[:, 2:]))``: two views of x's storage saved."""

    def forward(self, x):
        return torch.cat([x[:, :2].sin(), x[:, 2:].cos()], 1)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_one_storage_saved_twice_counts_once(device):
    x = torch.zeros(3, 5, device=device, requires_grad=True)
    got = memory.saved_bytes(SinPlusCos(), x)
    assert got.saved_tensors == 2
    assert (got.activation_storages, got.activation_bytes) == (1, 15 * F32)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_views_of_one_storage_count_once_at_full_size(device):
    x = torch.zeros(3, 4, device=device, requires_grad=True)
    got = memory.saved_bytes(HalvesSinCos(), x)
    assert got.saved_tensors == 2
    assert (got.activation_storages, got.activation_bytes) == (1, 12 * F32)


def test_distinct_meta_tensors_are_distinct_storages():
    a, b = torch.empty(4, device="meta"), torch.empty(4, device="meta")
    assert a.data_ptr() == b.data_ptr() == 0
    assert memory.storage_key(a)[0] != memory.storage_key(b)[0]
    assert memory.storage_key(a)[0] == memory.storage_key(a[1:])[0]
    assert memory.storage_key(a) == (memory.storage_key(a)[0], 16)


def test_parameters_are_constant_bytes_not_activations():
    lin = nn.Linear(6, 5, bias=False)
    got = memory.saved_bytes(lin, torch.zeros(2, 6, requires_grad=True))  # saves x and weight.t()
    assert (got.activation_bytes, got.constant_bytes) == (12 * F32, 30 * F32)
    no_dx = memory.saved_bytes(lin, torch.zeros(2, 6))  # d/dweight needs only x
    assert (no_dx.activation_bytes, no_dx.constant_bytes) == (12 * F32, 0)
    frozen = memory.saved_bytes(nn.Linear(6, 5).requires_grad_(False), torch.zeros(2, 6, requires_grad=True))
    assert (frozen.activation_bytes, frozen.constant_bytes) == (0, 30 * F32)  # d/dx needs only the weight


class _SaveClone(torch.autograd.Function):
    """Identity that saves a clone of its input (through the hooks) or stashes it on ctx."""

    @staticmethod
    def forward(ctx, x, stash):
        if stash:
            ctx.extra = x.clone()
        else:
            ctx.save_for_backward(x.clone())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class WithClone(nn.Module):
    def __init__(self, stash: bool = False) -> None:
        super().__init__()
        self.body, self.stash = small_model(), stash

    def forward(self, x):
        body = self.body
        h = body[2](body[1](body[0](x)))
        return body[4](body[3](_SaveClone.apply(h, self.stash)))


def test_negative_control_extra_clone_shows_more_bytes():
    base = memory.saved_bytes(small_model(), torch.zeros(2, 3, 5, 5))
    torch.manual_seed(0)
    clone = memory.saved_bytes(WithClone(), torch.zeros(2, 3, 5, 5))
    assert clone.activation_bytes == base.activation_bytes + 2 * 100 * F32
    assert clone.activation_storages == base.activation_storages + 1
    assert clone.custom_nodes == 1 and clone.custom_saved_bytes == 2 * 100 * F32
    assert clone.ctx_attr_bytes == 0


def test_ctx_attribute_stash_is_detected_but_not_counted():
    base = memory.saved_bytes(small_model(), torch.zeros(2, 3, 5, 5))
    stash = memory.saved_bytes(WithClone(stash=True), torch.zeros(2, 3, 5, 5))
    assert stash.activation_bytes == base.activation_bytes  # the hooks cannot see it
    assert (stash.ctx_attr_bytes, stash.ctx_attr_tensors) == (2 * 100 * F32, 1)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.lin, self.reentrant = nn.Linear(4, 4), reentrant

    def forward(self, x):
        return checkpoint.checkpoint(lambda a: self.lin(a).sin(), x, use_reentrant=self.reentrant).sum()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_regions_counted_and_only_their_input_saved(reentrant):
    x = torch.zeros(3, 4, requires_grad=True)
    init = checkpoint._checkpoint_hook.__init__
    got = memory.saved_bytes(Checkpointed(reentrant), x)
    assert checkpoint._checkpoint_hook.__init__ is init  # the counting wrapper is gone
    assert got.checkpoint_regions == 1
    assert (got.activation_storages, got.activation_bytes) == (1, 12 * F32)  # x; the inside is recomputed


def test_modes_are_restored():
    model = small_model().eval()
    model[1].train()
    memory.saved_bytes(model, torch.zeros(2, 3, 5, 5))
    assert [m.training for m in model.modules()] == [False, False, True, False, False, False]


def test_cli_writes_csv_md_and_readme_for_b0(tmp_path):
    csv, md, readme = tmp_path / "m.csv", tmp_path / "m.md", tmp_path / "README.md"
    readme.write_text(f"# x\n\n{memory.MARK_START}\nold\n{memory.MARK_END}\ntail\n")
    rc = memory.main(["--models", "b0", "--batch", "1", "--dtype", "bf16", "--memory-format", "nchw",
                      "--csv", str(csv), "--md", str(md), "--readme", str(readme)])
    assert rc == 0
    rows = read_rows(csv)
    assert [r["provider"] for r in rows] == ["eager", "converted"]
    eager, conv = rows
    assert (eager["model"], eager["resolution"], eager["batch"], eager["slope_batches"]) == ("b0", "224", "1", "1,2")
    assert (eager["dtype"], eager["layout"], eager["device"]) == ("bf16", "nchw", "meta")
    assert int(conv["converted_blocks"]) == 16
    assert float(eager["act_bytes_per_img"]) > 1e7  # bf16 B0 at 224: tens of MB per image
    # converted blocks train fused and recompute: one RecomputedMBConv node per block, ~0.1x the bytes
    assert float(conv["ratio"]) <= 0.35 and int(float(conv["act_bytes_per_img"])) < int(float(eager["act_bytes_per_img"]))
    assert conv["custom_nodes"] == "16"
    text = md.read_text()
    assert "| b0 | 224 |" in text and f"| {float(conv['ratio']):.2f} |" in text
    assert text.strip() in readme.read_text() and "old" not in readme.read_text()
    assert readme.read_text().endswith(f"{memory.MARK_END}\ntail\n")


def test_cli_rejects_unknown_model(tmp_path, capsys):
    rc = memory.main(["--models", "b9", "--csv", str(tmp_path / "m.csv"), "--md", str(tmp_path / "m.md")])
    assert rc == 2 and "b9" in capsys.readouterr().err


def test_table_says_when_the_ratio_drops():
    rows = [{"model": "b0", "resolution": "224", "batch": "8", "dtype": "fp32", "layout": "channels_last",
             "device": "meta", "provider": p, "act_mb_per_img": mb, "total_mb_per_img": mb, "ratio": r,
             "storages": "5", "custom_nodes": n} for p, mb, r, n in (("eager", "80", "1", "0"),
                                                                     ("converted", "40", "0.5", "32"))]
    text = memory.memory_table(rows)
    assert "| b0 | 224 | 80.0 | 40.0 | 0.50 |" in text and "exactly what" not in text


class NoMetaKernel(nn.Module):
    """A conv whose forward refuses meta tensors, like an op without a meta kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x):
        if x.is_meta:
            raise NotImplementedError("no meta kernel")
        return self.conv(x)


def test_meta_failure_falls_back_to_cpu_and_says_so(monkeypatch):
    from benchmarks import models as bench_models

    monkeypatch.setitem(bench_models._BUILDERS, "no-meta-test", lambda: (NoMetaKernel(), 4))  # undone after
    resolution, device, counts, blocks, note = memory.measure_model("no-meta-test", batch=1, layout="nchw")
    assert (resolution, device, blocks) == (4, "cpu", 0)
    assert "meta forward failed (NotImplementedError: no meta kernel)" in note
    assert counts["eager"].activation_bytes_per_image == 3 * 16 * F32  # the conv saves its input


def test_frozen_batchnorm_mode_counts_a_fine_tuning_forward(tmp_path):
    """``--batchnorm frozen``: every BatchNorm in eval mode while the model trains (eager saves each
    BatchNorm's input either way, not the batch statistics when frozen); the converted blocks run
    the eval ops and recompute in backward (one RecomputedFrozenMBConv node per block; the stem's and the
    head's ops two more nodes), saving about a twentieth of eager's bytes; modes are restored; the rows
    and the table say frozen."""
    model = small_model()
    x = torch.zeros(2, 3, 5, 5)
    training, frozen = memory.saved_bytes(model, x), memory.saved_bytes(model, x, frozen_bn=True)
    assert frozen.activation_bytes == training.activation_bytes - 2 * 4 * 4  # no batch mean / invstd
    assert all(m.training for m in model.modules())
    csv, md = tmp_path / "m.csv", tmp_path / "m.md"
    for mode in ("training", "frozen"):
        assert memory.main(["--models", "b0", "--batch", "1", "--batchnorm", mode, "--csv", str(csv),
                            "--md", str(md)]) == 0
    rows = read_rows(csv)
    assert [r["batchnorm"] for r in rows] == ["training", "training", "frozen", "frozen"]
    conv = rows[3]
    assert 0.02 < float(conv["ratio"]) <= 0.08 and conv["custom_nodes"] == "18", conv
    assert float(rows[2]["act_bytes_per_img"]) == float(rows[0]["act_bytes_per_img"])  # eager per image
    text = md.read_text()
    assert text.count("#### meta") == 2 and "BatchNorm frozen (fine-tuning)" in text
