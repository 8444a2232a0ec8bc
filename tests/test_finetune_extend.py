"""Model surgery: extending a model's vocabulary keeps every old output and weight."""

from __future__ import annotations

import pytest
import torch

import hermes.models as hm
from hermes.models.extend import (
    extend_vocabulary,
    plan_extension,
    similar_modality,
    similar_task,
    structure_name,
)

OLD_TASKS = ["a/liver", "a/kidney", "b/spleen", "b/bladder"]
GROUPS = {"a": {"tasks": ["a/liver", "a/kidney"], "modality": "CT"},
          "b": {"tasks": ["b/spleen", "b/bladder"], "modality": "T1"}}


def _model(dtype=torch.float64) -> hm.HermesResUNet:
    torch.manual_seed(1)
    m = hm.build("tiny", tasks=OLD_TASKS, modalities=["CT", "T1", "PET"], groups=GROUPS)
    with torch.no_grad():  # make every prior row distinct and non-trivial
        for f in m.fusion:
            f.task_priors.normal_()
            f.modality_priors.normal_()
    return m.to(dtype).eval()


def test_similarity_rules():
    assert structure_name("bcv/Liver") == "liver"
    assert similar_task("c/liver", OLD_TASKS) == "a/liver"
    assert similar_task("liver", OLD_TASKS) == "a/liver"
    assert similar_task("c/kidneys", OLD_TASKS) == "a/kidney"  # difflib ratio 0.92
    assert similar_task("c/heart", OLD_TASKS) is None
    assert similar_modality("T1w", ["CT", "T1"]) == "T1"
    assert similar_modality("FLAIR", ["CT", "T1", "T2"]) == ["T1", "T2"]
    assert similar_modality("US", ["CT", "T1"]) is None
    vocab = _model().vocab
    plan = plan_extension(vocab, ["c/liver", "c/heart"], ["US"], init="similar")
    assert plan["tasks"] == {"c/liver": "a/liver", "c/heart": None}
    assert plan["modalities"] == {"US": None}
    assert plan_extension(vocab, ["c/liver"], init="random")["tasks"] == {"c/liver": None}


def test_extension_layout_and_exact_copies():
    old = _model()
    new = extend_vocabulary(old, ["c/liver", "c/heart"], ["US", "T2w"],
                            groups={"c": {"tasks": ["c/liver", "c/heart"], "modality": "US"}},
                            generator=torch.Generator().manual_seed(0))
    assert new.vocab.tasks == OLD_TASKS + ["c/liver", "c/heart"]
    assert new.vocab.modalities == ["CT", "T1", "PET", "US", "T2w"]
    assert new.vocab.group("c") == ["c/liver", "c/heart"] and new.vocab.group("a") == \
        GROUPS["a"]["tasks"]
    for fo, fn in zip(old.fusion, new.fusion, strict=True):
        t_old = fo.task_priors
        assert fn.task_priors.shape == (len(OLD_TASKS) + 3, t_old.shape[1])
        assert torch.equal(fn.task_priors[:4], t_old[:4])
        assert torch.equal(fn.task_priors[-1], t_old[-1])  # null row stays last
        assert torch.equal(fn.task_priors[4], t_old[0])  # c/liver copies a/liver
        assert not torch.equal(fn.task_priors[5], t_old[0])  # c/heart random
        bound = (6.0 / (7 + t_old.shape[1])) ** 0.5
        assert fn.task_priors[5].abs().max() <= bound
        assert torch.equal(fn.modality_priors[:3], fo.modality_priors)
        assert torch.equal(fn.modality_priors[4], fo.modality_priors[1])  # T2w: MR rows (T1)
    # every other weight is copied exactly
    so, sn = old.state_dict(), new.state_dict()
    for k, v in so.items():
        if k.endswith(("task_priors", "modality_priors")) or k.startswith("modality_head.fc2"):
            continue
        assert torch.equal(v, sn[k]), k
    w_old, w_new = old.modality_head.fc2.weight, new.modality_head.fc2.weight
    assert w_new.shape == (5, w_old.shape[1]) and torch.equal(w_new[:3], w_old)
    assert torch.equal(new.modality_head.fc2.bias[:3], old.modality_head.fc2.bias)
    # old model untouched
    assert old.fusion[0].task_priors.shape[0] == 5


def test_old_tasks_bit_identical_in_float64():
    old = _model(torch.float64)
    new = extend_vocabulary(old, ["c/liver", "c/heart", "d/lesion"], ["US"])
    x = torch.randn(2, 1, 32, 16, 16, dtype=torch.float64)
    tasks = [["a/liver", "a/kidney"], ["b/spleen"]]
    with torch.no_grad():
        o = old(x, tasks=tasks, modality=["CT", "T1"])
        n = new(x, tasks=tasks, modality=["CT", "T1"])
    assert torch.equal(o.seg_logits, n.seg_logits)
    # modality logits: old columns equal up to GEMM blocking (a wider output layer may sum in
    # another order), one new column
    assert n.modality_logits.shape == (2, 4)
    torch.testing.assert_close(n.modality_logits[:, :3], o.modality_logits, rtol=1e-13,
                               atol=1e-15)
    # a new task is usable, and with the 'similar' init it starts as its source's clone
    with torch.no_grad():
        src = new(x, tasks=["a/liver"], modality="CT").seg_logits
        cl = new(x, tasks=["c/liver"], modality="CT").seg_logits
        us = new(x, tasks=["c/heart"], modality="US").seg_logits
    assert torch.equal(src, cl)
    assert us.shape == (2, 1, 32, 16, 16) and torch.isfinite(us).all()


def test_checkpoint_roundtrip_is_self_describing(tmp_path):
    new = extend_vocabulary(_model(torch.float32), ["c/liver"], ["US"],
                            groups={"c": {"tasks": ["c/liver"], "modality": "US"}})
    hm.save(new, tmp_path / "m.hermes")
    back = hm.load(tmp_path / "m.hermes")
    assert back.vocab.tasks == new.vocab.tasks and back.vocab.groups == new.vocab.groups
    for k, v in new.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])


def test_reserved_tasks_kept_and_errors():
    m = _model()
    m.vocab.reserved.append("b/bladder")
    new = extend_vocabulary(m, ["c/x"])
    assert new.vocab.reserved == ["b/bladder"]
    assert "b/bladder" not in plan_extension(m.vocab, ["c/bladder"])["tasks"].values()
    with pytest.raises(ValueError, match="already in the model"):
        extend_vocabulary(m, ["a/liver"])
    with pytest.raises(ValueError, match="already in the model"):
        extend_vocabulary(m, [], ["t1w"])  # alias of T1
    with pytest.raises(ValueError, match="twice"):
        extend_vocabulary(m, ["c/x", "c/x"])
    with pytest.raises(ValueError, match="init"):
        extend_vocabulary(m, ["c/x"], init="nearest")


def _as_main(branched: hm.HermesResUNet, k: int) -> hm.HermesResUNet:
    """A branch-free model whose decoder is branch ``k`` of ``branched`` (the oracle)."""
    config = hm.HermesConfig.from_dict({**branched.config.to_dict(), "decoder_branches": []})
    plain = hm.HermesResUNet(config, branched.vocab).eval()
    state = {}
    for key, value in branched.state_dict().items():
        if key.startswith("branches."):
            continue
        state[key] = value
    for key, value in branched.state_dict().items():
        prefix = f"branches.{k}."
        if key.startswith(prefix):
            rest = key[len(prefix):]
            rest = rest.replace("fusion.0.", "fusion.3.", 1).replace("fusion.1.", "fusion.4.", 1) \
                if rest.startswith("fusion.") else rest
            state[rest] = value
    plain.load_state_dict(state, strict=True)
    return plain


def test_decoder_branch_routes_new_tasks_and_keeps_old_outputs(tmp_path):
    from hermes.models.extend import add_decoder_branch

    old = _model(torch.float32)  # checkpoints load as float32
    ext = extend_vocabulary(old, ["c/liver", "c/heart"], ["US"],
                            generator=torch.Generator().manual_seed(0))
    br = add_decoder_branch(ext, len(OLD_TASKS)).eval()
    assert br.config.decoder_branches == (len(OLD_TASKS),)
    x = torch.randn(2, 1, 32, 16, 16)
    mods = ["CT", "US"]
    with torch.no_grad():
        # a copy of the main decoder gives the same outputs as the unbranched model
        new_only = [["c/heart", "c/liver"], ["c/liver"]]
        assert torch.equal(br(x, tasks=new_only, modality=mods).seg_logits,
                           ext(x, tasks=new_only, modality=mods).seg_logits)
        for p in br.branches[0].parameters():  # make the branch different
            p.add_(0.05 * torch.randn_like(p))
        branch = _as_main(br, 0)
        assert not torch.allclose(br(x, tasks=new_only, modality=mods).seg_logits,
                                  ext(x, tasks=new_only, modality=mods).seg_logits)
        assert torch.equal(br(x, tasks=new_only, modality=mods).seg_logits,
                           branch(x, tasks=new_only, modality=mods).seg_logits)
        # a request mixing decoders: each decoder's tasks as if requested on their own
        req = [["a/liver", "c/heart"], ["c/liver", "b/spleen"]]
        out = br(x, tasks=req, modality=mods)
        old_alone = ext(x, tasks=[["a/liver"], ["b/spleen"]], modality=mods)
        new_alone = branch(x, tasks=[["c/heart"], ["c/liver"]], modality=mods)
        assert torch.equal(out.seg_logits[0, 0], old_alone.seg_logits[0, 0])
        assert torch.equal(out.seg_logits[1, 1], old_alone.seg_logits[1, 0])
        assert torch.equal(out.seg_logits[0, 1], new_alone.seg_logits[0, 0])
        assert torch.equal(out.seg_logits[1, 0], new_alone.seg_logits[1, 0])
        assert torch.equal(out.modality_logits, old_alone.modality_logits)
        # old tasks alone: the old model's logits (batch of one, as hermes.segment runs)
        for tasks in (["a/liver", "b/bladder"], ["a/liver", "c/heart", "b/bladder"]):
            got = br(x[:1], tasks=tasks, modality="CT").seg_logits
            ref = old(x[:1], tasks=["a/liver", "b/bladder"], modality="CT").seg_logits
            assert torch.equal(got[:, [0, -1]], ref)
    # self-describing checkpoint; a second branch after the first
    hm.save(br, tmp_path / "br.hermes")
    back = hm.load(tmp_path / "br.hermes")
    with torch.no_grad():
        assert torch.equal(back(x, tasks=req, modality=["CT", "US"]).seg_logits, out.seg_logits)
    ext2 = extend_vocabulary(back, ["d/lung"], [])
    br2 = add_decoder_branch(ext2, len(OLD_TASKS) + 2)
    assert br2.config.decoder_branches == (4, 6) and len(br2.branches) == 2
    assert br2.parameter_counts()["backbone"] > old.parameter_counts()["backbone"]
    with pytest.raises(ValueError, match="decoder branch"):
        add_decoder_branch(ext2, 4)
    with pytest.raises(ValueError, match="ascending"):
        hm.HermesConfig(decoder_branches=(3, 3))
    # an unbranched config is written without the key (readable by older versions)
    assert "decoder_branches" not in old.config.to_dict()
