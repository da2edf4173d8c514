#!/usr/bin/env python3
"""Extracts plain English text from Debian documentation packages into a compact corpus.

Runs on the development machine (Debian 12), standard library only:

    apt-get install -y python3.11-doc linux-doc-6.1
    python3 tools/reference-model/prepare_data.py --out .refdata/corpus.txt.xz

Sources: python3.11-doc's HTML (/usr/share/doc/python3.11/html, HTML -> text with html.parser) and
linux-doc-6.1's reStructuredText / plain text (/usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz
and *.txt.gz, taken as is after light cleaning). Documents are cleaned (markup-only lines dropped,
blank runs collapsed), de-duplicated (whole documents and repeated paragraphs, by hash), sorted by
path for determinism and written as one xz file with documents separated by the byte 0x1E.
"""
import argparse
import gzip
import hashlib
import html.parser
import lzma
import os
import re
import sys

PY_HTML = "/usr/share/doc/python3.11/html"
LINUX_DOC = "/usr/share/doc/linux-doc-6.1/Documentation"
DOC_SEP = "\x1e"


class _TextExtractor(html.parser.HTMLParser):
    """Collects the visible text of a Sphinx page's main body."""

    SKIP = {"script", "style", "head", "nav", "footer", "title"}
    BLOCK = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre",
             "tr", "br", "table", "ul", "ol", "dl", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []
        self.skip_depth = 0
        self.in_body = False  # Sphinx puts the page text inside <div class="body" role="main">
        self.body_depth = 0
        self.div_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            self.div_depth += 1
            if not self.in_body and a.get("role") == "main":
                self.in_body = True
                self.body_depth = self.div_depth
        if tag in self.SKIP:
            self.skip_depth += 1
        if a.get("class") in ("headerlink", "sphinxsidebar", "related"):
            self.skip_depth += 1
            self._skip_tag = tag
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip_depth > 0:
            self.skip_depth -= 1
        if getattr(self, "_skip_tag", None) == tag and self.skip_depth > 0:
            self.skip_depth -= 1
            self._skip_tag = None
        if tag == "div":
            if self.in_body and self.div_depth == self.body_depth:
                self.in_body = False
            self.div_depth -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip_depth == 0 and self.in_body:
            self.parts.append(data)


def html_to_text(raw):
    p = _TextExtractor()
    p.feed(raw)
    p.close()
    text = "".join(p.parts)
    text = text.replace("\u00b6", "")  # Sphinx pilcrow permalinks
    return text


_MARKUP_LINE = re.compile(r"^\s*([=\-~^*+#`'\".:_<>|]{3,})\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\. (SPDX|_|\|)|^\s*\.\. [a-z-]+::\s*$|^\s*:(Author|Copyright|Date|Version|Revision|Last updated)[^:]*:")


def clean(text):
    out = []
    for line in text.splitlines():
        line = line.rstrip().replace("\t", "    ")
        if _MARKUP_LINE.match(line) or _DIRECTIVE.match(line) or "SPDX-License-Identifier" in line:
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"[ \u00a0]{2,}(?=\S)", lambda m: m.group(0) if m.start() == 0 else " ", text)
    text = re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text)
    return text.strip()


def iter_sources():
    if os.path.isdir(PY_HTML):
        for root, dirs, files in os.walk(PY_HTML):
            dirs[:] = sorted(d for d in dirs if not d.startswith("_"))
            for f in sorted(files):
                if f.endswith(".html") and not f.startswith(("genindex", "search", "py-modindex")):
                    path = os.path.join(root, f)
                    with open(path, encoding="utf-8", errors="replace") as fh:
                        yield path, html_to_text(fh.read())
    if os.path.isdir(LINUX_DOC):
        for root, dirs, files in os.walk(LINUX_DOC):
            dirs[:] = sorted(dirs)
            for f in sorted(files):
                if f.endswith(".rst.gz") or f.endswith(".txt.gz"):
                    path = os.path.join(root, f)
                    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
                        yield path, fh.read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".refdata/corpus.txt.xz")
    ap.add_argument("--max-bytes", type=int, default=40 << 20, help="stop after this much clean text")
    ap.add_argument("--min-doc-chars", type=int, default=400)
    args = ap.parse_args()

    seen_docs, seen_paras = set(), set()
    docs, stats = [], {"files": 0, "kept": 0, "dup_docs": 0, "short": 0, "dup_paras": 0, "bytes": 0}
    by_source = {"python3.11-doc": 0, "linux-doc-6.1": 0}
    for path, raw in iter_sources():
        stats["files"] += 1
        text = clean(raw)
        h = hashlib.sha1(text.encode()).digest()
        if h in seen_docs:
            stats["dup_docs"] += 1
            continue
        seen_docs.add(h)
        paras = []
        for para in text.split("\n\n"):
            key = hashlib.sha1(" ".join(para.split()).encode()).digest()
            if len(para) > 80 and key in seen_paras:
                stats["dup_paras"] += 1
                continue
            seen_paras.add(key)
            paras.append(para)
        text = "\n\n".join(paras).replace(DOC_SEP, " ")
        if len(text) < args.min_doc_chars:
            stats["short"] += 1
            continue
        docs.append(text)
        n = len(text.encode())
        stats["kept"] += 1
        stats["bytes"] += n
        by_source["python3.11-doc" if path.startswith(PY_HTML) else "linux-doc-6.1"] += n
        if stats["bytes"] >= args.max_bytes:
            break
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    blob = DOC_SEP.join(docs).encode()
    with lzma.open(args.out, "wb", preset=6) as fh:
        fh.write(blob)
    print(f"files read {stats['files']}, documents kept {stats['kept']} (duplicates {stats['dup_docs']}, "
          f"too short {stats['short']}, duplicate paragraphs dropped {stats['dup_paras']})")
    print(f"text {len(blob)/1e6:.1f} MB ({', '.join(f'{k} {v/1e6:.1f} MB' for k, v in by_source.items())}), "
          f"{args.out} {os.path.getsize(args.out)/1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
