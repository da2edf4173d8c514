#!/usr/bin/env python3
# How to: on a machine with `tokenizers` (the GPU machine has it), from the repository root run
#   python3 gpu-worker/model/testdata/make_tokenizer_fixtures.py gpu-worker/model/testdata/tokenizers
#
# Trains small byte-level BPE tokenizers (vocab 2000) with Hugging Face `tokenizers` on this repo's
# docs and sources plus a Unicode sample, one per pre-tokenizer flavour that
# gpu-worker/model/tokenizer.h supports, and records what `tokenizers` itself answers for a set of
# hard texts (encode with and without special tokens) and id sequences (decode with and without
# skipping special tokens). tokenizer_test.cc compares against these answers exactly.
#
#   gpt2/    ByteLevel(use_regex=True) pre-tokenizer, merges written in the legacy "a b" string
#            form, special <|endoftext|>, special <mask> with lstrip.
#   gpt2_prefix/  gpt2's model with ByteLevel add_prefix_space=True.
#   llama3/  Split(Llama-3 regex) + ByteLevel(use_regex=False), ignore_merges, a TemplateProcessing
#            post-processor that prepends <|begin_of_text|>, plus tokenizer_config.json and
#            generation_config.json as transformers writes them for Llama-3.
#   qwen2/   NFC normalizer, Split(Qwen2 regex) + ByteLevel(use_regex=False), special ChatML tokens,
#            non-special added tokens <think> (not normalized) and café (normalized).
import glob
import json
import os
import random
import sys

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")

UNICODE_SAMPLE = """
Café, naïve, Zürich, résumé, façade, jalapeño, smörgåsbord, Ærøskøbing, Łódź, İstanbul, ß.
Decomposed: cafe\u0301 nai\u0308ve A\u030a \u212b \u1100\u1161\u11a8 e\u0301\u0302 \u1f00\u0345.
日本語のテキストと中文混合、한국어 텍스트입니다。東京は晴れです。我们的系统很快。
Emoji: 😀 😃 👍🏽 👨‍👩‍👧 🇫🇷 🚀🚀🚀 ❤️ ✨
Digits: 0 1 12 123 1234 12345 3.14159 2026-11-22 1,000,000 ١٢٣٤ ४५६ Ⅻ ½ ²³
Whitespace:\u00a0nbsp\u3000ideographic\u2003em\ttab\n\n\nnewlines\r\nwindows   spaces    end
Contractions: I'm you're we've they'll he'd she's it's don't WON'T I'M Y'ALL
Greek: Καλημέρα κόσμε. Russian: Привет, мир! Hebrew: שלום עולם. Arabic: مرحبا بالعالم.
Hindi: नमस्ते दुनिया। Thai: สวัสดีชาวโลก
Code: for (int i = 0; i < n; ++i) { x[i] += y[i] * 2; } // C++20 std::string_view -> absl::StatusOr<T>
"""

# Texts whose encodings the tests check. Each flavour's special tokens appear in some of them.
HARD = [
    "",
    " ",
    "a",
    "Hello world",
    "Hello, world! How's it going?",
    "  leading spaces",
    "trailing spaces   ",
    "a      b",
    "x \n y",
    " \n\n  \n z",
    "\n\n\n",
    "\t\t tabs\tand\nnewlines\r\n\r\nmore\r\r",
    "   \n",
    "I'm sure they'll've done it, isn't it? DON'T 'S 'Re 'll'd",
    "'s 'S 'ſ 'K \u2019s",
    "'ſx 'Sx 'tx 'REx 'Ll 'Dx it'sx IT'S",
    "'",
    "''''",
    "1234567890 12 3.14159 2026-11-22 1,000,000",
    "a1b22c333d4444e55555",
    "١٢٣٤٥ ४५६ Ⅻ ½ ²³ 四五六",
    "café naïve Zürich résumé",
    "cafe\u0301 and café and CAFE\u0301",
    "A\u030a \u212b \u00c5 \u1100\u1161\u11a8 \uac01 e\u0301\u0302 \u1f00\u0345 \u0344 \u0958",
    "\u0301leading combining mark",
    "ﬁ ligature ① circled Ｆｕｌｌ",
    "日本語のテキストと中文混合",
    "한국어 텍스트입니다",
    "😀 👍🏽 👨‍👩‍👧 🇫🇷 🚀🚀🚀",
    "\u00a0nbsp\u3000ideographic\u2003em \x1c\x1f\x0b\x0c\x85 end",
    "!!!??? ... --- *** ///",
    "a,b;c:d",
    "foo.bar(baz)[0] = {x: 1};\n\treturn absl::OkStatus();\n}\n",
    "C++20 std::string_view<char> -> absl::StatusOr<T>",
    "Καλημέρα κόσμε. Привет, мир! שלום עולם. مرحبا بالعالم.",
    "नमस्ते दुनिया। สวัสดีชาวโลก",
    "word\n\n  \tword  \n",
    ".\n\n\n.",
    "<|endoftext|>",
    "Hello<|endoftext|> world <|endoftext|><|endoftext|>",
    "<|begin_of_text|>Hello<|eot_id|> world<|end_of_text|>",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<mask> x <mask>y  <mask>",
    "<think>café</think> cafe\u0301<think>",
    "<|endoftext",
    "<|im_start|><|im_start|>",
]

SOURCE_GLOBS = ["docs/*.md", "README.md", "ARCHITECTURE.md", "gpu-worker/model/*.cc", "gpu-worker/model/*.h",
                "kvstore/*.h", "common/*.h"]


def corpus():
    texts = []
    for pattern in SOURCE_GLOBS:
        for path in sorted(glob.glob(pattern)):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    texts += [UNICODE_SAMPLE] * 20 + HARD * 5
    return texts


def train(flavour):
    tok = Tokenizer(models.BPE())
    if flavour in ("gpt2", "gpt2_prefix"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        special = ["<|endoftext|>"]
    else:
        pattern = LLAMA3 if flavour == "llama3" else QWEN2
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        if flavour == "llama3":
            special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"]
        else:
            tok.normalizer = normalizers.NFC()
            special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=2, show_progress=False, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if flavour in ("gpt2", "gpt2_prefix"):
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif flavour == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)]),
        ])
    else:
        tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                        AddedToken("</think>", special=False, normalized=False),
                        AddedToken("café", special=False, normalized=True)])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    j = json.loads(tok.to_str())
    if flavour == "gpt2_prefix":
        j["pre_tokenizer"]["add_prefix_space"] = True
    if flavour in ("gpt2", "gpt2_prefix"):
        j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    if flavour == "llama3":
        j["model"]["ignore_merges"] = True
    text = json.dumps(j, ensure_ascii=False, indent=1)
    return Tokenizer.from_str(text), text


def cases(tok, flavour):
    rng = random.Random(7)
    out = {"tokenizers_version": tokenizers.__version__, "encode": [], "decode": []}
    with open("docs/architecture.md", encoding="utf-8") as f:
        long_text = f.read()[:6000]
    for text in HARD + [UNICODE_SAMPLE, long_text]:
        plain = tok.encode(text, add_special_tokens=False).ids
        with_special = tok.encode(text, add_special_tokens=True).ids
        out["encode"].append({
            "text": text,
            "ids": plain,
            "ids_add_special": with_special,
            "decoded": tok.decode(plain, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(with_special, skip_special_tokens=True),
        })
    n = tok.get_vocab_size(with_added_tokens=True)
    specials = [tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values()]
    for _ in range(60):
        ids = [rng.randrange(n) if rng.random() > 0.15 else rng.choice(specials)
               for _ in range(rng.randint(1, 8))]
        out["decode"].append({
            "ids": ids,
            "text": tok.decode(ids, skip_special_tokens=False),
            "text_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    return out


def main():
    out_dir = sys.argv[1]
    for flavour in ["gpt2", "gpt2_prefix", "llama3", "qwen2"]:
        d = os.path.join(out_dir, flavour)
        os.makedirs(d, exist_ok=True)
        tok, text = train(flavour)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(text)
        with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as f:
            json.dump(cases(tok, flavour), f, ensure_ascii=False, indent=0)
        if flavour == "llama3":
            # As transformers writes them for meta-llama/Llama-3.1-8B-Instruct (trimmed).
            with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                           "clean_up_tokenization_spaces": True, "model_max_length": 131072,
                           "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
            with open(os.path.join(d, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": tok.token_to_id("<|begin_of_text|>"),
                           "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")],
                           "do_sample": True}, f, indent=2)
        print(flavour, "vocab", tok.get_vocab_size(), "bytes", len(text))


if __name__ == "__main__":
    main()
