"""Hermes-ResUNet: names, mixed batches, prior selection, gradients, sizes, bad inputs, counts."""

from __future__ import annotations

import pytest
import torch

import hermes.models as hm
from hermes.models.hermes_resunet import HermesOutput

TASKS = ["liver", "spleen", "kidney", "gm", "wm", "csf"]
MODS = ["CT", "T1", "PET"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hm.build("tiny", tasks=TASKS, modalities=MODS).eval()


@pytest.fixture(scope="module")
def model64(model):
    """The same model in float64, for equivalences that float32 rounding would blur."""
    return hm.build("tiny", tasks=TASKS, modalities=MODS).eval().double().requires_grad_(False)


def test_name_form_mixed_batch_matches_single_samples(model64):
    model = model64
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, tasks=[["liver", "spleen"], ["gm", "wm", "csf"]], modality=["CT", "T1"])
        seg, mod = out  # unpacks as a tuple
        assert isinstance(out, HermesOutput)
        assert seg.shape == (2, 3, 32, 32, 32) and mod.shape == (2, 3)
        assert out.task_mask.tolist() == [[True, True, False], [True, True, True]]
        # the null padding of sample 0 is internal: its two real tasks equal a batch of one
        # padded the same way by index (null tokens participate in attention as in the official
        # model, so a sample's logits depend on how many null tokens accompany it)
        idx = torch.tensor([[0, 1, -1, -1]])
        ref0 = model(x[:1], task_idx=idx, modality_idx=torch.tensor([0])).seg_logits
        torch.testing.assert_close(seg[0, :2], ref0[0, :2], rtol=1e-10, atol=1e-10)
        ref1 = model(x[1:], tasks=["gm", "wm", "csf"], modality="T1")
        torch.testing.assert_close(seg[1], ref1.seg_logits[0], rtol=1e-10, atol=1e-10)


def test_name_form_equals_index_form_with_trailing_null(model):
    x = torch.randn(1, 1, 24, 20, 32)
    with torch.no_grad():
        by_name = model(x, tasks=["kidney", "liver"], modality="pet")
        by_idx = model(x, task_idx=torch.tensor([[2, 0, -1]]), modality_idx=torch.tensor([[2]]))
    assert by_idx.seg_logits.shape[1] == 3  # index form returns every column, nulls included
    torch.testing.assert_close(by_name.seg_logits, by_idx.seg_logits[:, :2])
    torch.testing.assert_close(by_name.modality_logits, by_idx.modality_logits)


def test_request_order_is_output_order(model64):
    model = model64
    x = torch.randn(1, 1, 32, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        a = model(x, tasks=["liver", "gm"], modality="CT").seg_logits
        b = model(x, tasks=["gm", "liver"], modality="CT").seg_logits
    # attention over priors is permutation-equivariant in the task tokens
    torch.testing.assert_close(a[:, [1, 0]], b, rtol=1e-10, atol=1e-10)


def test_gradients_reach_only_selected_priors(model):
    m = hm.build("tiny", tasks=TASKS, modalities=MODS)
    x = torch.randn(1, 1, 32, 16, 16)
    out = m(x, tasks=["spleen", "wm"], modality="T1")
    (out.seg_logits.sum() + out.modality_logits.sum()).backward()
    for layer in m.fusion:
        used_rows = {1, 4, len(TASKS)}  # spleen, wm, the null token
        row_grad = layer.task_priors.grad.abs().sum(dim=1)
        for r in range(len(TASKS) + 1):
            assert (row_grad[r] > 0) == (r in used_rows), f"task row {r}"
        mod_grad = layer.modality_priors.grad.abs().sum(dim=(1, 2))
        assert mod_grad[1] > 0 and mod_grad[0] == 0 and mod_grad[2] == 0


@pytest.mark.parametrize("shape", [(16, 16, 32), (17, 33, 20), (23, 16, 47)])
def test_any_input_size(model, shape):
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        seg, _ = model(x, tasks=["liver"], modality="CT")
    assert seg.shape == (1, 1, *shape) and torch.isfinite(seg).all()


def test_modality_head_detects_modality_logits_shape(model):
    with torch.no_grad():
        out = model(torch.randn(3, 1, 16, 32, 16), tasks=["liver"], modality=["CT", "T1", "PET"])
    probs = out.modality_logits.softmax(-1)
    assert probs.shape == (3, len(MODS))
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(tasks=["livr"], modality="CT"), KeyError, "did you mean 'liver'"),
        (dict(tasks=["liver"], modality="MRX"), KeyError, "unknown modality 'MRX'"),
        (dict(tasks="liver", modality="CT"), TypeError, "not a str"),
        (dict(tasks=[[]], modality="CT"), ValueError, "no task"),
        (dict(tasks=["liver", "liver"], modality="CT"), ValueError, "more than once"),
        (dict(tasks=["liver"]), ValueError, "both tasks= and modality="),
        (dict(task_idx=torch.tensor([[7]]), modality_idx=torch.tensor([0])), ValueError, "[-1, 5]"),
        (dict(tasks=["liver", 1], modality="CT"), TypeError, "list of task names"),
        (dict(tasks=[["liver"], "gm"], modality="CT"), TypeError, "one list of names per"),
        (dict(tasks=[], modality="CT"), ValueError, "no task requested"),
        (dict(tasks=["liver"], modality=0), TypeError, "modality_idx="),
    ],
)
def test_bad_names_and_indices(model, kwargs, exc, words):
    with pytest.raises(exc) as info:
        model(torch.randn(1, 1, 32, 16, 16), **kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "x, exc, words",
    [
        (torch.randn(1, 32, 16, 16), ValueError, "5-D"),
        (torch.randn(1, 2, 32, 16, 16), ValueError, "2 channels"),
        (torch.ones(1, 1, 32, 16, 16, dtype=torch.int64), TypeError, "floating-point"),
        (torch.randn(1, 1, 8, 32, 32), ValueError, "too small"),
        (torch.randn(1, 1, 16, 31, 16), ValueError, "too small"),
        (torch.full((1, 1, 32, 16, 16), float("nan")), ValueError, "NaN"),
    ],
)
def test_bad_inputs(model, x, exc, words):
    with pytest.raises(exc, match=words):
        model(x, tasks=["liver"], modality="CT")


def test_parameter_counts_match_official_presets():
    vocab = dict(tasks=[f"t{i}" for i in range(72)], modalities=list("abcdef"))
    small = hm.build("small", **vocab).parameter_counts()
    base = hm.build("base", **vocab).parameter_counts()
    # official Hermes-ResUNet: 10.14M (width 16) and 40.56M (width 32) backbone parameters;
    # priors + fusion layers add 17.9M at width 32
    assert round(small["backbone"] / 1e6, 2) == 10.14
    assert round(base["backbone"] / 1e6, 2) == 40.56
    assert round((base["priors"] + base["fusion"]) / 1e6, 1) == 17.9
    assert base["total"] == sum(base[k] for k in ("backbone", "priors", "fusion", "heads"))


def test_unknown_preset_and_narrow_width():
    with pytest.raises(ValueError, match="unknown preset"):
        hm.build("huge", tasks=["a"])
    with pytest.raises(ValueError, match="head width"):
        hm.build("tiny", tasks=["a"], base_width=4)
    with pytest.raises(ValueError, match="head_dim must be positive"):
        hm.build("tiny", tasks=["a"], head_dim=0)


def test_modality_names_differing_in_case_are_one_name():
    """Modalities are looked up ignoring case, so 'T1' and 't1' would share one prior row;
    aliases of the collection YAMLs resolve."""
    with pytest.raises(ValueError, match="duplicate modality names: .*'T1'.*'t1'"):
        hm.Vocabulary(["a"], ["T1", "t1", "CT"])
    # the spellings collection YAMLs accept are accepted at inference too
    vocab = hm.Vocabulary(["a"], ["CT", "T1", "T2", "CINE"])
    for name, canonical in (("T1ce", "T1"), ("MPRAGE", "T1"), ("cine-MRI", "CINE"),
                            ("T2-weighted", "T2"), ("mr t1", "T1")):
        assert vocab.canonical_modality(name) == canonical
    with pytest.raises(hm.UnknownNameError, match="unknown modality 'PET'"):
        vocab.modality_index("PET")


def test_bad_vocabularies_are_refused():
    with pytest.raises(TypeError, match=r"got the str 'liver' \(for one name: \['liver'\]\)"):
        hm.build("tiny", tasks="liver")
    with pytest.raises(TypeError, match="modalities must be a list"):
        hm.build("tiny", tasks=["liver"], modalities="CT")
    for spec in ({"tasks": []}, {"modality": "CT"}, {"tasks": "liver"}, ["liver"]):
        with pytest.raises(ValueError, match="group 'g' must be a mapping with a non-empty"):
            hm.Vocabulary(["liver"], ["CT"], {"g": spec})


@pytest.mark.filterwarnings("ignore")  # dynamo's graph-break and torch.jit notices
def test_torch_compile_traces_the_model_on_cpu():
    """Dynamo traces the whole forward (it could not trace the oneDNN convolution); the
    eager backend keeps the test fast while running dynamo's tracing."""
    torch.manual_seed(0)
    m = hm.build("tiny", tasks=["a", "b"], modalities=["CT"]).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = m(x, tasks=["a"], modality="CT").seg_logits
        out = torch.compile(m, backend="eager")(x, tasks=["a"], modality="CT").seg_logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_modality_logits_alone_equal_the_forward_pass(model):
    """What modality detection runs: the encoder and the coarse decoder stages only, the
    same logits as a whole forward pass, per sample of a batch of several modalities."""
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        whole = model(x, tasks=["liver"], modality=["CT", "T1"]).modality_logits
        alone = model.modality_logits(x, tasks=["liver"], modality=["CT", "T1"])
    assert alone.shape == (2, len(MODS)) and torch.equal(alone, whole)
