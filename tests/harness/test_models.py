"""The harness models: shapes, initial loss, causality, tying, sizes, routing, pretrained GPT-2."""

import json
import math

import pytest
import torch

import asgo
from asgo.harness.models import GPT, MODEL_CONFIGS, Llama, build_model, load_gpt2_pretrained

VOCAB = 65
TINY = {"gpt": dict(name="tiny", n_layer=2, n_embd=64), "llama": dict(name="llama-tiny", n_embd=64)}


def tiny(kind, **overrides):
    torch.manual_seed(0)
    settings = {**TINY[kind], "vocab_size": VOCAB, **overrides}
    return build_model(settings.pop("name"), **settings)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_shapes_and_initial_loss(kind):
    model = tiny(kind)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, VOCAB, (4, 32), generator=g), torch.randint(0, VOCAB, (4, 32), generator=g)
    logits, loss = model(x, y)
    assert logits.shape == (4, 32, VOCAB)
    assert abs(loss.item() - math.log(VOCAB)) < 0.25  # near-uniform predictions at init
    assert model(x)[1] is None


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_masked_targets_are_ignored(kind):
    model = tiny(kind).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    y = torch.randint(0, VOCAB, (2, 16))
    masked = y.clone()
    masked[:, :10] = -100
    logits, loss = model(x, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, VOCAB), y[:, 10:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_causal(kind):
    model = tiny(kind).eval()
    x = torch.randint(0, VOCAB, (2, 24))
    changed = x.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


def test_too_long_sequence_is_an_error():
    model = tiny("gpt", block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_tied_and_untied_heads():
    gpt, llama = tiny("gpt"), tiny("llama")
    assert gpt.lm_head.weight is gpt.wte.weight
    assert gpt.num_parameters() == sum(p.numel() for p in set(gpt.parameters()))
    assert llama.lm_head.weight is not llama.embed_tokens.weight


def test_residual_projection_init_is_scaled_by_depth():
    model = build_model("tiny", n_layer=8, vocab_size=VOCAB)
    std = model.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_parameter_counts_on_meta_device():
    # nanogpt, vocab 65 (C = 384, 6 layers, block 256): per block
    #   attention 4 * (C*C + C) = 591,360; MLP C*4C + 4C + 4C*C + C = 1,181,568; two LayerNorms 4C = 1,536
    #   -> 1,774,464, times 6 = 10,646,784; + wte 65*384 = 24,960 + wpe 256*384 = 98,304 + ln_f 768
    #   = 10,770,816 (10,672,512 without the embeddings: nanoGPT's "10.65M"-style count excludes wpe).
    # llama-60m (C = 512, FFN 1376, 8 layers, vocab 32000, no biases): per layer
    #   attention 4*C*C = 1,048,576; SwiGLU 3*C*1376 = 2,113,536; two RMSNorms 2C = 1,024 -> 3,163,136,
    #   times 8 = 25,305,088; + embed 32000*512 = 16,384,000 + untied head 16,384,000 + final norm 512
    #   = 58,073,600.
    # gpt2 (vocab 50304): 12 * 7,087,872 + 50304*768 + 1024*768 + 1,536 = 124,475,904.
    with torch.device("meta"):
        nanogpt = build_model("nanogpt", vocab_size=65)
        llama = build_model("llama-60m")
        gpt2 = build_model("gpt2")
    assert nanogpt.num_parameters() == 10_770_816
    assert nanogpt.num_parameters(exclude_embeddings=True) == 10_770_816 - 24_960 - 98_304
    assert llama.num_parameters() == 58_073_600
    assert gpt2.num_parameters() == 124_475_904
    assert nanogpt.wte.weight.device.type == "meta"


def test_named_configs():
    assert set(MODEL_CONFIGS) >= {"tiny", "nanogpt", "gpt2", "gpt2-large", "llama-60m", "llama-tiny"}
    c = MODEL_CONFIGS["nanogpt"]
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.dropout) == (6, 6, 384, 256, 0.2)
    c = MODEL_CONFIGS["gpt2-large"]
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (36, 20, 1280, 1024)
    c = MODEL_CONFIGS["llama-60m"]
    assert (c.n_layer, c.n_head, c.n_embd, c.intermediate_size) == (8, 8, 512, 1376)
    assert (c.vocab_size, c.block_size) == (32000, 256)
    assert isinstance(tiny("gpt"), GPT) and isinstance(tiny("llama"), Llama)
    with pytest.raises(ValueError, match="unknown model 'gpt3'"):
        build_model("gpt3")
    with pytest.raises(ValueError, match="no setting \\['n_layers'\\]"):
        build_model("tiny", n_layers=3)
    with pytest.raises(ValueError, match="divisible"):
        build_model("tiny", n_head=3)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_routing(kind):
    model = tiny(kind)
    opt = asgo.build_optimizer(model, "asgo")
    routes = {r.name: r for r in opt.routes}
    n_head = model.config.n_head
    adamw = {name for name, r in routes.items() if r.algorithm == "adamw"}
    matrices = {name for name, r in routes.items() if r.algorithm == "asgo"}
    assert adamw | matrices == set(routes)
    for name, r in routes.items():
        if r.param.ndim < 2:
            assert name in adamw, name
    if kind == "gpt":
        assert routes["wte.weight"].role == "embedding" and routes["wpe.weight"].role == "embedding"
        assert "lm_head.weight" not in routes  # tied: the same tensor as wte, counted once
        assert {"ln_f.weight", "ln_f.bias", "h.0.attn.q_proj.bias", "h.0.mlp.c_fc.bias"} <= adamw
        attn, mlp = "h.{}.attn.{}.weight", ["h.{}.mlp.c_fc.weight", "h.{}.mlp.c_proj.weight"]
        others = ["v_proj", "c_proj"]
    else:
        assert routes["embed_tokens.weight"].role == "embedding"
        assert routes["lm_head.weight"].role == "head" and "lm_head.weight" in adamw
        assert {"norm.weight", "layers.0.input_layernorm.weight"} <= adamw
        attn = "layers.{}.self_attn.{}.weight"
        mlp = ["layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.up_proj.weight", "layers.{}.mlp.down_proj.weight"]
        others = ["v_proj", "o_proj"]
    for i in range(model.config.n_layer):
        for proj in ("q_proj", "k_proj"):
            assert routes[attn.format(i, proj)].num_heads == n_head
            assert attn.format(i, proj) in matrices
        for proj in others:
            assert routes[attn.format(i, proj)].num_heads == 1 and attn.format(i, proj) in matrices
        assert {m.format(i) for m in mlp} <= matrices
    n_matrices = model.config.n_layer * (4 + len(mlp))
    assert len(matrices) == n_matrices


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_asgo_steps_reduce_loss_on_a_fixed_batch(kind):
    model = tiny(kind)
    opt = asgo.build_optimizer(model, "asgo", lr=1e-2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, VOCAB, (8, 32), generator=g), torch.randint(0, VOCAB, (8, 32), generator=g)
    losses = []
    for _ in range(8):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


# --- pretrained GPT-2 from a local Hugging Face directory ---------------------------------------

@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=50,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a mix-up would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_load_gpt2_safetensors_matches_transformers(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = load_gpt2_pretrained(tmp_path).eval()
    assert model.lm_head.weight is model.wte.weight
    assert model.config.gelu_approximate == "tanh" and model.config.vocab_size == 50
    x = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        ours = model(x)[0]
    torch.testing.assert_close(ours, hf_logits(hf_gpt2, x), rtol=0, atol=1e-5)
    routes = {r.name: r for r in asgo.build_optimizer(model, "asgo").routes}
    assert routes["h.1.attn.k_proj.weight"].num_heads == 2 and routes["wte.weight"].algorithm == "adamw"


def test_load_gpt2_pytorch_bin_without_prefix(hf_gpt2, tmp_path):
    # transformers 5 always writes safetensors; write the legacy pickle by hand, in the layout of
    # the original hub checkpoints (GPT2Model keys, no "transformer." prefix, mask buffers).
    hf_gpt2.config.save_pretrained(tmp_path)
    state = dict(hf_gpt2.transformer.state_dict())
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_gpt2_pretrained(tmp_path, dropout=0.1, block_size=8).eval()
    assert model.config.dropout == 0.1 and model.wpe.weight.shape == (8, 32)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        ours = model(x)[0]
    torch.testing.assert_close(ours, hf_logits(hf_gpt2, x), rtol=0, atol=1e-5)


def test_load_gpt2_errors(hf_gpt2, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gpt2_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt2_pretrained(tmp_path)
    hf_gpt2.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_gpt2_pretrained(tmp_path)
    state = {f"transformer.{k}": v for k, v in hf_gpt2.transformer.state_dict().items()}
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.2.ln_1.weight"] = torch.ones(32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    keys = r"missing keys \['h.1.mlp.c_fc.bias'\], unexpected keys \['h.2.ln_1.weight'\]"
    with pytest.raises(KeyError, match=keys):
        load_gpt2_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot be overridden"):
        load_gpt2_pretrained(tmp_path, n_layer=4)
    with pytest.raises(ValueError, match="n_positions"):
        load_gpt2_pretrained(tmp_path, block_size=32)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        load_gpt2_pretrained(tmp_path)


def test_llama_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                      max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.1)
    ours = build_model("llama-tiny", n_layer=2, n_head=4, n_embd=64, intermediate_size=172, block_size=32,
                       vocab_size=VOCAB).eval()
    # our parameter names are Hugging Face's without the "model." prefix
    ours.load_state_dict({k.removeprefix("model."): v for k, v in theirs.state_dict().items()}, strict=True)
    x = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x).logits, rtol=0, atol=1e-5)


def test_grow_vocab_keeps_rows_and_tying():
    model = tiny("gpt")
    old = model.wte.weight.detach().clone()
    model.grow_vocab(VOCAB + 3)
    assert model.wte.weight.shape == (VOCAB + 3, 64) and model.config.vocab_size == VOCAB + 3
    assert torch.equal(model.wte.weight[:VOCAB], old) and model.lm_head.weight is model.wte.weight
    logits, _ = model(torch.tensor([[VOCAB + 2, 0]]))
    assert logits.shape == (1, 2, VOCAB + 3)
