"""The reference model's architecture, attention kernel, corpus loading, checkpoints and export.

Shared by train.py and eval.py (PyTorch + transformers + tokenizers; run on the device machine).
"""
import hashlib
import json
import lzma
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

# recall-tiny: 4 layers, hidden 384, 4 query heads / 2 kv-heads of head_dim 128 (GQA group 2),
# SwiGLU 768, vocab 4096 tied with the input embedding, RoPE theta 5e5, trained up to 32K tokens.
# 7.47 M parameters = 14.9 MB in bf16.
ARCH = dict(hidden_size=384, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=128, rope_theta=500000.0, max_position_embeddings=32768,
            rms_norm_eps=1e-5, initializer_range=0.02)
DOC_SEP = "\x1e"
HOLDOUT_FRACTION = 0.03

ATTN_STATS = {"calls": 0, "mask_none": 0}


def kvr_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention through torch SDPA (flash kernel in bf16), ignoring HF's mask.

    query: [B, Hq, T, D]; key, value: [B, Hkv, S, D]. We never pad (every batch row has the same
    length), so the mask is always plain causal: T == S (training, prefill) or T == 1 (decode).
    Returns ([B, T, Hq, D], None) like transformers' own attention functions.
    """
    ATTN_STATS["calls"] += 1
    ATTN_STATS["mask_none"] += attention_mask is None
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # q head h reads kv head h // n_rep, as transformers' repeat_kv does
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    t, s = query.shape[2], key.shape[2]
    if t != s and t != 1:
        raise ValueError(f"kvr_sdpa handles T == S or T == 1, got T={t}, S={s}")
    out = F.scaled_dot_product_attention(query, key, value, is_causal=(t == s and t > 1), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def install_attention():
    """Routes transformers' "sdpa" attention to kvr_sdpa (GQA by repeat_interleave + flash)."""
    try:
        from transformers import AttentionInterface
        AttentionInterface.register("sdpa", kvr_sdpa)
        return "AttentionInterface"
    except Exception as e:  # older transformers: patch the modeling module's table
        import transformers.models.llama.modeling_llama as ml
        ml.ALL_ATTENTION_FUNCTIONS["sdpa"] = kvr_sdpa
        return f"patched ({e})"


def make_config(vocab_size, bos, eos, pad):
    from transformers import LlamaConfig

    a = dict(ARCH)
    theta = a.pop("rope_theta")
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_act="silu", tie_word_embeddings=True,
                      attention_bias=False, mlp_bias=False, bos_token_id=bos, eos_token_id=eos,
                      pad_token_id=pad, rope_theta=theta, **a)
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = theta
        rp.setdefault("rope_type", "default")
    else:
        cfg.rope_theta = theta
    cfg._attn_implementation = "sdpa"
    return cfg


def check_model(model):
    """Asserts the properties the worker relies on: RoPE theta, tied head, GQA shapes."""
    theta, d = ARCH["rope_theta"], ARCH["head_dim"]
    want = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    inv = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert inv, "no rotary inv_freq buffer"
    got = inv[0].detach().double().cpu()
    assert torch.allclose(got, want, rtol=1e-5), ("rope theta mismatch", got[:4], want[:4])
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        model.tie_weights()
        assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    a = model.model.layers[0].self_attn
    assert a.q_proj.weight.shape == (ARCH["num_attention_heads"] * d, ARCH["hidden_size"])
    assert a.k_proj.weight.shape == (ARCH["num_key_value_heads"] * d, ARCH["hidden_size"])


def build_model(tokenizer):
    from transformers import LlamaForCausalLM

    v = tokenizer.get_vocab_size()
    cfg = make_config(v, tokenizer.token_to_id("<|bos|>"), tokenizer.token_to_id("<|eos|>"),
                      tokenizer.token_to_id("<|pad|>"))
    model = LlamaForCausalLM(cfg)
    check_model(model)
    return model


def load_corpus(tokenizer, path, cache_dir="/tmp"):
    """Token arrays (train, holdout) of the corpus: documents joined by <|eos|>, uint16.

    Documents are shuffled with a fixed seed; the last 3% are held out (eval haystacks).
    """
    h = hashlib.sha1(open(path, "rb").read(1 << 20) + tokenizer.to_str().encode()).hexdigest()[:12]
    cache = os.path.join(cache_dir, f"kvr_corpus_{h}.npz")
    if os.path.exists(cache):
        z = np.load(cache)
        return z["train"], z["holdout"]
    with lzma.open(path, "rb") as fh:
        docs = fh.read().decode("utf-8").split(DOC_SEP)
    order = np.random.default_rng(1234).permutation(len(docs))
    docs = [docs[i] for i in order]
    n_hold = max(1, int(len(docs) * HOLDOUT_FRACTION))
    eos = tokenizer.token_to_id("<|eos|>")
    out = []
    for part in (docs[:-n_hold], docs[-n_hold:]):
        encs = tokenizer.encode_batch(part)
        ids = []
        for e in encs:
            ids.extend(e.ids)
            ids.append(eos)
        out.append(np.asarray(ids, dtype=np.uint16))
    np.savez(cache, train=out[0], holdout=out[1])
    return out[0], out[1]


def save_shards(model, out_dir, prefix="ckpt", shards=3):
    """fp32 weights in `shards` safetensors files (each under the 16 MiB transfer limit)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}  # tied with model.embed_tokens.weight
    keys = sorted(sd, key=lambda k: -sd[k].numel())
    buckets, sizes = [dict() for _ in range(shards)], [0] * shards
    for k in keys:
        i = int(np.argmin(sizes))
        buckets[i][k] = sd[k]
        sizes[i] += sd[k].numel() * 4
    os.makedirs(out_dir, exist_ok=True)
    for i, b in enumerate(buckets):
        save_file(b, os.path.join(out_dir, f"{prefix}{i}.safetensors"))


def load_shards(model, ckpt_dir, prefix="ckpt"):
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(os.listdir(ckpt_dir)):
        if f.startswith(prefix) and f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(ckpt_dir, f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    check_model(model)


def export(model, tokenizer_path, out_dir):
    """HF directory: config.json + model.safetensors (bf16) + tokenizer.json (+ tokenizer_config.json)."""
    import copy

    os.makedirs(out_dir, exist_ok=True)
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config._attn_implementation = "sdpa"
    m.save_pretrained(out_dir, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(out_dir, extra)
        if os.path.exists(p):
            os.remove(p)
    shutil.copy(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
                   "eos_token": "<|eos|>", "pad_token": "<|pad|>", "add_bos_token": False,
                   "model_max_length": ARCH["max_position_embeddings"]}, fh, indent=2)
    # Pin the fields the worker's loader reads, whatever this transformers version chose to write.
    cpath = os.path.join(out_dir, "config.json")
    c = json.load(open(cpath))
    for key in ("torch_dtype", "dtype"):
        if key in c:
            c[key] = "bfloat16"
    if "torch_dtype" not in c and "dtype" not in c:
        c["torch_dtype"] = "bfloat16"
    c["tie_word_embeddings"] = True
    c["head_dim"] = ARCH["head_dim"]
    with open(cpath, "w") as fh:
        json.dump(c, fh, indent=2, sort_keys=True)
        fh.write("\n")
    try:
        check_export_config(cpath)
    except AssertionError as e:  # report, but keep the trained weights
        print("WARNING: exported config.json may not load in the worker:", e, flush=True)
    print("config.json:", json.dumps(c, sort_keys=True), flush=True)


def check_export_config(path):
    """Mirrors what gpu-worker/model/config.cc accepts, so a bad export fails here, not there."""
    c = json.load(open(path))
    arch = (c.get("architectures") or [None])[0]
    assert arch == "LlamaForCausalLM", arch
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert isinstance(c.get(k), int), k
    assert c.get("head_dim") == ARCH["head_dim"], c.get("head_dim")
    assert c.get("hidden_act", "silu") == "silu"
    assert not c.get("mlp_bias", False) and not c.get("attention_bias", False)
    assert not c.get("use_sliding_window", False)
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
    assert theta == ARCH["rope_theta"], theta
    rs = c.get("rope_scaling", c.get("rope_parameters"))
    if isinstance(rs, dict):
        assert rs.get("rope_type", rs.get("type", "default")) in ("default", None), rs
    dt = c.get("torch_dtype", c.get("dtype"))
    assert dt in (None, "bfloat16"), dt
    assert c.get("tie_word_embeddings") is True, c.get("tie_word_embeddings")
    return c
