"""The residual stream's channels permuted by one permutation for the whole model (issue 23, "residual")."""
import pytest
import torch

from slim_trt.algorithms.permute import nm_retained
from slim_trt.compression.calibration.residual import permute_residual, residual_plan
from slim_trt.errors import SlimError
from tests.conftest import calib_windows, tiny_config, tiny_model


def _model(family: str):
    """The tiny families (Mistral too), plus OPT with project_in/out (word_embed_proj_dim 32 != hidden 64) and Gemma 3
    with tied embeddings."""
    import transformers as tf

    if family == "opt-proj":
        cfg = tf.OPTConfig(**{**tiny_config("opt").to_dict(), "word_embed_proj_dim": 32})
    elif family == "gemma3-tied":
        cfg = tf.Gemma3TextConfig(**{**tiny_config("gemma3").to_dict(), "tie_word_embeddings": True})
    else:
        return tiny_model(family)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(5.0)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3", "gemma3-tied", "opt", "opt-proj"])
def test_residual_permutation_keeps_the_logits_and_gains_on_its_readers(family):
    model = _model(family)
    with torch.no_grad():  # norms and biases away from their 1 / 0 start, so a missed one would show
        g = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        # a few strong channels, as LLM residual streams have: what the permutation has to spread over the groups
        emb = model.get_input_embeddings().weight
        if emb.shape[1] == 64:
            emb[:, :6] *= 20.0
    windows = calib_windows(n=4, seqlen=16)
    with torch.no_grad():
        ref = model(windows).logits
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    readers = [w.detach().clone() for w, _ in residual_plan(model)["readers"]]
    perm, shares = permute_residual(model, windows, 2, 4)
    assert sorted(perm.tolist()) == list(range(64)) and not torch.equal(perm, torch.arange(64))
    with torch.no_grad():
        assert torch.allclose(model(windows).logits, ref, rtol=1e-4, atol=1e-4)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    names = [k for k in shares if not k.endswith(":after")]
    assert len(names) == 2 * (4 if family.startswith("opt") else 5) and len(readers) == len(names)
    # each reader's columns moved by perm; the shares sum (the search's objective, normalised per layer) grows
    for (w, _), before in zip(residual_plan(model)["readers"], readers):
        assert torch.equal(w, before[:, perm])
    # the readers' mean kept share: 0.78 -> 0.79 (OPT with projections) .. 0.83 (Gemma 3)
    before, after = sum(shares[k] for k in names), sum(shares[k + ":after"] for k in names)
    assert (after - before) / len(names) > 0.008


def test_the_reported_share_is_the_readers_kept_wanda_saliency():
    from slim_trt.compression.calibration.residual import reader_norms

    model = tiny_model("llama")
    windows = calib_windows(n=4, seqlen=16)
    W = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    norm = reader_norms(model, windows, 8)["1.mlp.up_proj"]
    _, shares = permute_residual(model, windows, 2, 4)
    score = W.abs() * norm
    assert shares["1.mlp.up_proj"] == pytest.approx(nm_retained(score) / float(score.sum()), rel=1e-5)


def test_a_given_permutation_is_applied_as_it_is():
    """A resumed run re-applies the permutation its first blocks were compressed in."""
    model = tiny_model("llama")
    windows = calib_windows(n=2, seqlen=16)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    up = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    got, _ = permute_residual(model, windows, 2, 4, perm=perm)
    assert torch.equal(got, perm) and torch.equal(model.model.layers[0].mlp.up_proj.weight, up[:, perm])
    # a saved permutation of another width (another model's resume folder) is refused before anything moves
    emb = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(SlimError, match="has 32 channels, the model 64: the resume folder is another model's"):
        permute_residual(model, windows, 2, 4, perm=torch.randperm(32))
    assert torch.equal(model.model.embed_tokens.weight, emb)


def test_an_unknown_layer_is_refused_before_anything_moves():
    model = tiny_model("llama")
    block = model.model.layers[0]
    block.mlp.extra_proj = torch.nn.Linear(64, 64)  # a layer this module does not know: not permuted exactly
    emb = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(SlimError, match=r"cannot permute llama's layer 0.mlp.extra_proj exactly: drop residual"):
        permute_residual(model, calib_windows(n=2, seqlen=16), 2, 4)
    assert torch.equal(model.model.embed_tokens.weight, emb)


def test_a_missed_tensor_is_caught_by_the_logits_check(monkeypatch):
    """Were a norm left out, the logits would move: refused in one line, not saved."""
    import slim_trt.compression.calibration.residual as residual

    real = residual.residual_plan

    def forgetful(model):
        plan = real(model)
        norm = model.model.norm.weight
        return {**plan, "other": [(t, d) for t, d in plan["other"] if t is not norm]}

    monkeypatch.setattr(residual, "residual_plan", forgetful)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.add_(torch.linspace(-0.5, 0.5, 64))
    with pytest.raises(SlimError, match=r"changed llama's logits \(relative error .*\): .* drop residual"):
        permute_residual(model, calib_windows(n=2, seqlen=16), 2, 4)
