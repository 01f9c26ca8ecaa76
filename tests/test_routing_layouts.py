"""Routing on real model layouts: tiny random-init Hugging Face models built from configs
(offline), plus hand-built PEFT- and ViT-style wrappers."""
import copy

import pytest
import torch
from torch import nn

import asgo
from asgo.routing import OPTIMIZERS, ROUTED_DEFAULTS

T = pytest.importorskip("transformers")

TRANSPOSABLE = [n for n in OPTIMIZERS if "transposed" in asgo.routing._accepts(n)]


def gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                                          bos_token_id=0, eos_token_id=0))


def gqa(config_class, **extra):
    """A decoder with grouped-query attention: 8 query heads, 2 key-value heads of 8."""
    torch.manual_seed(0)
    config = config_class(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=50, **extra)
    return T.AutoModelForCausalLM.from_config(config)


def lm_loss(model, seed=0, vocab=50):
    idx = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=idx, labels=idx).loss


def routes_of(opt):
    return {r.name: r for r in opt.routes}


def row_of(report, name):
    return next(line for line in report.splitlines() if line.split()[0] == name)


@pytest.mark.parametrize("name", sorted(set(OPTIMIZERS) - {"adamw"}))
def test_gpt2_conv1d_weights_are_transposed_and_fused_qkv_stays_whole(name):
    model = gpt2()
    opt = asgo.build_optimizer(model, name, lr=1e-2, **({"rank": 4} if "lore" in name else {}))
    routes = routes_of(opt)
    conv1d = {f"transformer.h.{i}.{m}.weight" for i in range(2)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {n for n, r in routes.items() if r.transposed} == conv1d
    assert all(routes[n].algorithm == name and routes[n].num_heads == 1 for n in conv1d)
    assert routes["transformer.wte.weight"].role == "embedding"
    assert routes["transformer.h.0.attn.c_attn.bias"].role == "vector"
    transposed = [p for g in opt.param_groups if g.get("transposed") for p in g["params"]]
    if name in TRANSPOSABLE:
        assert {id(p) for p in transposed} == {id(routes[n].param) for n in conv1d}
    else:
        assert transposed == []
    assert "(in, out)" in row_of(opt.report(), "transformer.h.0.mlp.c_fc.weight")
    loss = lm_loss(model)
    loss.backward()
    opt.step()
    assert torch.isfinite(lm_loss(model))


@pytest.mark.parametrize("name", TRANSPOSABLE)
def test_a_conv1d_weight_steps_as_its_out_in_transpose(name):
    """Each GPT-2 Conv1D weight (stored (in, out)) moves exactly as the same optimizer moves the
    (out, in) copy, and not as it moves the stored layout (Muon's shape scaling, DASGO's side,
    ASGO's and GaLore's side of a square block differ; Shampoo and Adafactor are symmetric)."""
    settings = {"lr": 1e-2, **({"rank": 4, "update_proj_gap": 2} if "lore" in name else {})}
    model = gpt2()
    opt = asgo.build_optimizer(model, name, **settings)
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
             "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]
    params = dict(model.named_parameters())
    initial = {n: params[n].detach().clone() for n in names}
    logical = [nn.Parameter(params[n].detach().T.clone()) for n in names]
    stored = [nn.Parameter(params[n].detach().clone()) for n in names]
    settings = {**ROUTED_DEFAULTS.get(name, {}), **settings}
    ref_logical, ref_stored = OPTIMIZERS[name](logical, **settings), OPTIMIZERS[name](stored, **settings)
    for s in range(3):
        opt.zero_grad()
        (lm_loss(model, s) * 1e-3).backward()  # gradients around 1e-4
        for n, a, b in zip(names, logical, stored):
            a.grad, b.grad = params[n].grad.T.clone(), params[n].grad.clone()
        opt.step()
        ref_logical.step()
        ref_stored.step()
    for n, a, b in zip(names, logical, stored):
        torch.testing.assert_close(params[n], a.T, rtol=1e-5, atol=1e-7)
    moved = {n: (params[n] - initial[n]).abs().max() for n in names}
    assert all(m > 1e-4 for m in moved.values())
    largest = max((params[n] - b).abs().max() / moved[n] for n, b in zip(names, stored))
    if name in ("shampoo", "adafactor"):  # the same for W and W^T: the flag changes nothing
        assert largest < 1e-5
    else:
        assert largest > 1e-3  # exact equality above: round-off is 0


@pytest.mark.parametrize("config_class", ["LlamaConfig", "MistralConfig", "Qwen2Config", "Exaone4Config"])
def test_grouped_query_attention_splits_queries_and_keys_by_their_head_counts(config_class):
    model = gqa(getattr(T, config_class))
    opt = asgo.build_optimizer(model, "asgo", lr=1e-2)
    routes = routes_of(opt)
    for i in range(2):
        prefix = f"model.layers.{i}.self_attn"
        assert routes[f"{prefix}.q_proj.weight"].num_heads == 8    # 64 rows: 8 heads of 8
        assert routes[f"{prefix}.k_proj.weight"].num_heads == 2    # 16 rows: 2 heads of 8
        assert routes[f"{prefix}.v_proj.weight"].num_heads == 1
        assert routes[f"{prefix}.o_proj.weight"].num_heads == 1
    assert routes["lm_head.weight"].role == "head" and routes["model.embed_tokens.weight"].role == "embedding"
    k_proj = routes["model.layers.0.self_attn.k_proj.weight"].param
    assert opt.state[k_proj]["preconditioner"].shape == (2, 8, 8)
    assert "asgo (heads=2)" in row_of(opt.report(), "model.layers.0.self_attn.k_proj.weight")
    lm_loss(model).backward()
    opt.step()
    assert opt.diagnostics()["skipped_steps"] == 0 and torch.isfinite(lm_loss(model))
    # only ASGO splits heads
    assert all(r.num_heads == 1 for r in asgo.build_optimizer(gqa(getattr(T, config_class)), "muon").routes)


def test_gpt_neox_fused_query_key_value_stays_whole():
    torch.manual_seed(0)
    model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=96,
                                                 num_attention_heads=4, vocab_size=50))
    routes = routes_of(asgo.build_optimizer(model, "asgo"))
    assert routes["gpt_neox.layers.0.attention.query_key_value.weight"].num_heads == 1
    assert routes["gpt_neox.layers.0.attention.query_key_value.weight"].algorithm == "asgo"
    assert routes["lm_head.weight"].role == "head" and routes["gpt_neox.embed_in.weight"].role == "embedding"
    assert not any(r.transposed for r in routes.values())


def test_bert_attention_heads_and_nested_output_layers():
    """BERT: query/key split by the attention module's head count; its per-layer ``output``
    modules are hidden layers (inside ``layer.0``), its ``classifier`` the head."""
    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                          vocab_size=50, num_labels=3)
    model = T.BertForSequenceClassification(config)
    routes = routes_of(asgo.build_optimizer(model, "asgo"))
    layer = "bert.encoder.layer.0"
    assert routes[f"{layer}.attention.self.query.weight"].num_heads == 4
    assert routes[f"{layer}.attention.self.key.weight"].num_heads == 4
    for n in (f"{layer}.output.dense.weight", f"{layer}.attention.output.dense.weight",
              "bert.pooler.dense.weight"):
        assert (routes[n].role, routes[n].algorithm) == ("matrix", "asgo")
    assert (routes["classifier.weight"].role, routes["classifier.weight"].algorithm) == ("head", "adamw")
    assert routes["bert.embeddings.position_embeddings.weight"].role == "embedding"


class Attention(nn.Module):
    def __init__(self, rows, **attributes):
        super().__init__()
        self.__dict__.update(attributes)
        self.q_proj, self.k_proj = nn.Linear(64, rows), nn.Linear(64, rows)


@pytest.mark.parametrize("attributes, note", [
    ({"num_heads": 12}, "not head-wise: 12 heads do not fit 64 rows"),
    ({"num_heads": 4, "head_dim": 8}, "not head-wise: 4 heads of 8 do not fit 64 rows"),
])
def test_a_head_count_that_does_not_fit_gives_no_split_and_a_note(attributes, note):
    model = nn.ModuleDict({"attn": Attention(64, **attributes)})
    opt = asgo.build_optimizer(model, "asgo")
    assert all(r.num_heads == 1 for r in opt.routes)
    assert row_of(opt.report(), "attn.q_proj.weight").endswith(note)
    assert row_of(opt.report(), "attn.k_proj.weight").endswith(note)
    model.attn.q_proj.weight.grad = torch.randn(64, 64) * 1e-3
    opt.step()


@pytest.mark.parametrize("query_heads", ["num_attention_heads", "num_heads", "n_head", "n_heads"])
@pytest.mark.parametrize("kv_heads", ["num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head"])
@pytest.mark.parametrize("head_dim", ["head_dim", "head_size"])
def test_module_attributes_give_key_value_heads_before_the_query_count(query_heads, kv_heads, head_dim):
    model = nn.ModuleDict({"attn": Attention(64, **{query_heads: 8, kv_heads: 2, head_dim: 32})})
    model.attn.q_proj = nn.Linear(64, 256)
    routes = routes_of(asgo.build_optimizer(model, "asgo"))
    assert (routes["attn.q_proj.weight"].num_heads, routes["attn.k_proj.weight"].num_heads) == (8, 2)
    del model.attn.__dict__[kv_heads]  # no key-value count: keys split like queries
    model.attn.k_proj = nn.Linear(64, 256)
    assert routes_of(asgo.build_optimizer(model, "asgo"))["attn.k_proj.weight"].num_heads == 8


@pytest.mark.parametrize("query, key", [("q_proj", "k_proj"), ("query", "key"), ("to_q", "to_k"),
                                        ("wq", "wk"), ("c_q", "c_k"), ("q", "k")])
def test_query_and_key_module_names(query, key):
    attention = nn.Module()
    attention.n_head = 4
    setattr(attention, query, nn.Linear(32, 32))
    setattr(attention, key, nn.Linear(32, 32))
    attention.v = nn.Linear(32, 32)
    routes = routes_of(asgo.build_optimizer(nn.ModuleDict({"attn": attention}), "asgo"))
    heads = {n.split(".")[1]: r.num_heads for n, r in routes.items() if n.endswith("weight")}
    assert heads == {query: 4, key: 4, "v": 1}


class ModulesToSave(nn.Module):
    """PEFT's ModulesToSaveWrapper layout: a frozen original and a trainable copy per adapter."""

    def __init__(self, module):
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module).requires_grad_(True)})

    def forward(self, x):
        return self.modules_to_save["default"](x)


def test_a_peft_wrapped_classification_head_goes_to_adamw():
    torch.manual_seed(0)
    config = T.LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=96, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=50, num_labels=3, pad_token_id=0)
    classifier = T.LlamaForSequenceClassification(config)
    classifier.score = ModulesToSave(classifier.score)
    peft = nn.Module()  # PeftModel's naming: base_model.model.<the wrapped model>
    peft.base_model = nn.Module()
    peft.base_model.model = classifier
    opt = asgo.build_optimizer(peft, "muon")
    routes = routes_of(opt)
    head = routes["base_model.model.score.modules_to_save.default.weight"]
    assert (head.role, head.algorithm) == ("head", "adamw")
    assert "base_model.model.score.original_module.weight" not in routes  # frozen
    assert routes["base_model.model.model.layers.0.mlp.up_proj.weight"].algorithm == "muon"
    idx = torch.randint(1, 50, (2, 8))
    nn.functional.cross_entropy(peft.base_model.model(input_ids=idx).logits, torch.tensor([0, 2])).backward()
    before = head.param.detach().clone()
    opt.step()
    assert not torch.equal(head.param, before)


class PatchEmbed(nn.Module):
    """timm-style raw parameters next to a patch projection."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 32, 8, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 32))
        self.register_tokens = nn.Parameter(torch.zeros(1, 4, 32))
        self.layer_scale = nn.Parameter(torch.ones(32, 32))
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 4))
        self.pos_bias = nn.Parameter(torch.zeros(5, 5))


def test_embedding_like_raw_parameters_go_to_adamw_and_every_role_is_reported():
    torch.manual_seed(0)
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         image_size=16, patch_size=8)
    vit = nn.ModuleDict({"vit": T.ViTModel(config, use_mask_token=True), "timm": PatchEmbed()})
    opt = asgo.build_optimizer(vit, "asgo")
    routes = routes_of(opt)
    for n in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "vit.embeddings.mask_token",
              "timm.pos_embed", "timm.register_tokens", "timm.relative_position_bias_table", "timm.pos_bias"):
        assert (routes[n].role, routes[n].algorithm) == ("embedding", "adamw"), n
    for n in ("vit.embeddings.patch_embeddings.projection.weight", "timm.proj.weight", "timm.layer_scale"):
        assert (routes[n].role, routes[n].algorithm) == ("matrix", "asgo"), n
    queries = [r for n, r in routes.items() if n.endswith(("q_proj.weight", "query.weight"))]
    assert queries and all(r.num_heads == 4 for r in queries)
    report = opt.report()
    for r in opt.routes:
        assert row_of(report, r.name).split()[2] == r.role
