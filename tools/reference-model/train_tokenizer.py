#!/usr/bin/env python3
"""Trains the byte-level BPE tokenizer of the reference model (runs where `tokenizers` is installed).

    python3 tools/reference-model/train_tokenizer.py --corpus .refdata/corpus.txt.xz \
        --out $OUT/tokenizer.json --vocab-size 4096

Layout of the result (so that the worker's current raw-byte prompts are valid token ids too):
- ids 0..255 are the 256 single bytes, id == byte value (ByteLevel's printable-character alphabet);
- ids 256..V-4 are BPE merges in rank order; no merge contains a decimal digit, so every digit is
  its own token (numbers in the synthetic tasks tokenize one digit per token, rigidly);
- ids V-3, V-2, V-1 are the special tokens <|bos|>, <|eos|>, <|pad|>.
Pre-tokenizer and decoder: ByteLevel (GPT-2 regex, no prefix space); no normalizer, no
post-processor (the training code inserts <|bos|> itself). Loadable by tokenizers.Tokenizer and by
transformers.PreTrainedTokenizerFast(tokenizer_file=...).
"""
import argparse
import json
import lzma
import sys

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
DOC_SEP = "\x1e"


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def load_docs(path):
    with lzma.open(path, "rb") as fh:
        return fh.read().decode("utf-8").split(DOC_SEP)


def train(docs, vocab_size, seed_extra=600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + seed_extra, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    j = json.loads(tok.to_str())

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges_in = j["model"]["merges"]
    pair_format = bool(merges_in) and isinstance(merges_in[0], list)
    kept = []
    want = vocab_size - len(SPECIALS)
    for m in merges_in:
        a, b = (m if pair_format else m.split(" "))
        new = a + b
        if any(c in "0123456789" for c in new):
            continue
        if a not in vocab or b not in vocab:
            continue
        if new not in vocab:
            if len(vocab) >= want:
                break
            vocab[new] = len(vocab)
        kept.append([a, b] if pair_format else f"{a} {b}")
    if len(vocab) < want:
        raise RuntimeError(f"only {len(vocab)} tokens after filtering; raise seed_extra")
    added = []
    for i, s in enumerate(SPECIALS):
        vocab[s] = want + i
        added.append({"id": want + i, "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    j["model"]["vocab"] = vocab
    j["model"]["merges"] = kept
    j["added_tokens"] = added
    j["post_processor"] = None
    j["normalizer"] = None
    return Tokenizer.from_str(json.dumps(j, ensure_ascii=False)), len(kept)


def check(tok, docs, vocab_size):
    """Round-trips, id layout and digit rule; returns bytes per token on a sample."""
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    for s, i in zip(SPECIALS, range(vocab_size - 3, vocab_size)):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    for ch in ("A", " ", "\n", "~", "\x00"):
        assert tok.encode(ch).ids == [ord(ch)], (ch, tok.encode(ch).ids)
    assert tok.encode(" 48213").ids == [32, 52, 56, 50, 49, 51], tok.encode(" 48213").ids
    nbytes = ntok = 0
    for d in docs[:: max(1, len(docs) // 200)]:
        ids = tok.encode(d).ids
        if tok.decode(ids) != d:
            print("WARNING: decode(encode(doc)) != doc for a document", flush=True)
        nbytes += len(d.encode())
        ntok += len(ids)
    return nbytes / max(1, ntok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=".refdata/corpus.txt.xz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    docs = load_docs(args.corpus)
    tok, n_merges = train(docs, args.vocab_size)
    bpt = check(tok, docs, args.vocab_size)
    tok.save(args.out)
    try:  # the form transformers users will load it in
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_file=args.out, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                     pad_token=SPECIALS[2])
        got = hf("The pass key is 48213.", add_special_tokens=False)["input_ids"]
        print("PreTrainedTokenizerFast loads it:", got == tok.encode("The pass key is 48213.").ids,
              "bos id", hf.bos_token_id)
    except Exception as e:  # informative only
        print("WARNING: PreTrainedTokenizerFast check:", repr(e))
    print(f"tokenizer: vocab {args.vocab_size} ({n_merges} merges, digits unmerged), "
          f"{bpt:.2f} bytes/token on the corpus, saved to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
