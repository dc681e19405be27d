"""Generate a KorQuAD 2.x-format sample (HTML pages, split files) from a KorQuAD v1.0 file's articles.

    python3 scripts/make_korquad2_sample.py --source data/korquad_sample.json --output_dir data/korquad2_sample

Each v1 article becomes one page in the shape of a Wikipedia page: a navigation block, a heading,
an infobox table, its paragraphs under h2/h3 sections with reference marks, a table of its answers
(header and data rows), a nested list, a reference list and a script; text is HTML-escaped and some
characters written as character references. Questions of every answer kind: the v1 questions
(phrases), and per page one sentence, one paragraph (its <p> element), the table, the list (their
HTML) and one infobox value. `answer_start` indexes the HTML `context`, as in KorQuAD 2.x.
Pages go round-robin into `korquad2.1_train_NN.json` files, the last page into `korquad2.1_dev_00.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

# Written as references: escaping is character by character, so an escaped substring of a text
# is the substring of the escaped text, and answer offsets can be found piece by piece.
_ENCODED = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "(": "&#40;", ")": "&#x29;", "%": "&#37;"}


def encode(text: str) -> str:
    return "".join(_ENCODED.get(char, char) for char in text)


class PageWriter:
    """Appends HTML pieces and records where answers land in the page."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0

    def write(self, markup: str) -> int:
        """Append `markup`; returns the offset it starts at."""
        start = self.length
        self.parts.append(markup)
        self.length += len(markup)
        return start

    def html(self) -> str:
        return "".join(self.parts)


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence ending in '다.' (or the text's end), spaces trimmed."""
    spans, start = [], 0
    for index in range(len(text)):
        if text.startswith("다. ", index) or index == len(text) - 1:
            end = index + 2 if text.startswith("다.", index) else len(text)
            sentence = text[start:end]
            lead = len(sentence) - len(sentence.lstrip())
            if sentence.strip():
                spans.append((start + lead, start + lead + len(sentence.strip())))
            start = end
    return spans


def make_page(article: dict[str, Any], page_number: int, rng: random.Random) -> dict[str, Any]:
    """One v1 article as a KorQuAD 2.x document with answers of every kind."""
    title = article["title"]
    paragraphs = article["paragraphs"]
    page = PageWriter()
    qas: list[dict[str, Any]] = []

    def add_question(qas_id: str, question: str, start: int, text: str) -> None:
        qas.append({"id": qas_id, "question": question, "answer": {"text": text, "answer_start": start}})

    page.write('<nav class="site-nav"><a href="/">대문</a> · <a href="/random">임의 문서</a></nav>\n')
    page.write(f'<div class="navbox"><b>둘러보기</b><ul><li><a href="/wiki/{encode(title)}">{encode(title)}'
               '</a></li><li>관련 문서</li></ul></div>\n')
    page.write(f"<h1>{encode(title)}</h1>\n")
    first_answer = paragraphs[0]["qas"][0]["answers"][0]["text"]
    page.write(f'<table class="infobox"><tr><th colspan="2">{encode(title)}</th></tr>\n'
               f"<tr><th>문단 수</th><td>{len(paragraphs)}</td></tr>\n<tr><th>대표 낱말</th><td>")
    infobox_start = page.write(encode(first_answer))
    page.write("</td></tr>\n</table>\n")
    add_question(f"kq2-{page_number}-infobox", f"{title} 문서 정보 상자의 대표 낱말은?", infobox_start,
                 encode(first_answer))

    paragraph_spans: list[tuple[int, int]] = []
    for number, paragraph in enumerate(paragraphs):
        context = paragraph["context"]
        heading = "h2" if number % 2 == 0 else "h3"
        page.write(f'<{heading}>{number + 1}. {encode(title)} {number + 1}<span class="mw-editsection">'
                   f"[<a>편집</a>]</span></{heading}>\n")
        element_start = page.write("<p>")
        text_start = page.write(encode(context))
        page.write(f'<sup class="reference">[{number + 1}]</sup></p>')
        paragraph_spans.append((element_start, page.write("\n")))
        for qa in paragraph["qas"]:
            answer = qa["answers"][0]
            if answer["text"].strip() != answer["text"] or answer["text"] == context.strip():
                continue  # a v1 answer with spaces at its edges, or the whole paragraph: not a phrase
            offset = text_start + len(encode(context[:answer["answer_start"]]))
            add_question(qa["id"], qa["question"], offset, encode(answer["text"]))
        spans = _sentences(context)
        if number == 0 and len(spans) > 1:  # one sentence alone would be the whole paragraph
            start, end = spans[rng.randrange(len(spans))]
            add_question(f"kq2-{page_number}-sentence", f"{title}: '{context[start:end][:12]}'(으)로 시작하는 문장은?",
                         text_start + len(encode(context[:start])), encode(context[start:end]))
    chosen = rng.randrange(len(paragraph_spans))
    start, end = paragraph_spans[chosen]
    add_question(f"kq2-{page_number}-paragraph", f"{title}의 {chosen + 1}번째 문단 전체는?", start,
                 page.html()[start:end])

    page.write(f"<h2>{encode(title)}의 낱말 표</h2>\n")
    table_start = page.write('<table class="wikitable">\n<tr><th>번호</th><th>낱말</th><th>문단</th></tr>\n')
    answers = [(number, qa["answers"][0]["text"]) for number, paragraph in enumerate(paragraphs)
               for qa in paragraph["qas"]][:6]
    for row, (number, text) in enumerate(answers):
        page.write(f"<tr><td>{row + 1}</td><td>{encode(text)}</td><td>{number + 1}</td></tr>\n")
    page.write("</table>")
    add_question(f"kq2-{page_number}-table", f"{title}의 낱말 표는?", table_start, page.html()[table_start:])

    page.write(f"\n<h3>{encode(title)} 목록</h3>\n")
    list_start = page.write("<ul>")
    for number, paragraph in enumerate(paragraphs[:3]):
        page.write(f"<li>{number + 1}번째 문단<ul>")
        for qa in paragraph["qas"][:2]:
            page.write(f"<li>{encode(qa['answers'][0]['text'])}</li>")
        page.write("</ul></li>")
    page.write("</ul>")
    add_question(f"kq2-{page_number}-list", f"{title} 목록의 항목들은?", list_start, page.html()[list_start:])

    page.write('\n<h2>각주</h2>\n<ol class="references">')
    for number in range(len(paragraphs)):
        page.write(f"<li>↑ {encode(title)} 자료 {number + 1}</li>")
    page.write("</ol>\n<script>window.pageName = \"" + encode(title) + "\";</script>\n")
    context = page.html()
    for qa in qas:  # what KorQuAD 2.x promises: answer_start points at the answer text
        answer = qa["answer"]
        assert context[answer["answer_start"]:answer["answer_start"] + len(answer["text"])] == answer["text"]
    return {"title": title, "url": f"https://ko.wikipedia.org/wiki/{title}", "context": context,
            "raw_html": f"<!DOCTYPE html><html><head><title>{encode(title)}</title><style>p {{margin: 0}}</style>"
                        f"</head><body>{context}</body></html>", "qas": qas}


def make_dataset(source: dict[str, Any], num_pages: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first `num_pages` usable articles of a v1 dataset as KorQuAD 2.x documents."""
    rng = random.Random(seed)
    articles = [article for article in source["data"]
                if article["paragraphs"] and article["paragraphs"][0]["qas"]][:num_pages]
    return [make_page(article, number, rng) for number, article in enumerate(articles)]


def write_split(documents: list[dict[str, Any]], output_dir: Path, train_files: int) -> list[Path]:
    """The last document to `korquad2.1_dev_00.json`, the others round-robin over `train_files` files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    shards = {f"korquad2.1_train_{n:02d}.json": documents[:-1][n::train_files] for n in range(train_files)}
    shards["korquad2.1_dev_00.json"] = documents[-1:]
    written = []
    for name, shard in shards.items():
        path = output_dir / name
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps({"version": "KorQuAD_2.1_sample", "data": shard}, ensure_ascii=False,
                                        indent=0) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="data/korquad_sample.json", help="a KorQuAD v1.0 JSON file")
    parser.add_argument("--output_dir", default="data/korquad2_sample")
    parser.add_argument("--num_pages", type=int, default=5)
    parser.add_argument("--train_files", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_pages < 2 or args.train_files < 1:
        print("make_korquad2_sample.py: error: --num_pages must be at least 2 and --train_files at least 1",
              file=sys.stderr)
        return 1
    try:
        source = json.loads(Path(args.source).read_text(encoding="utf-8-sig"))
        documents = make_dataset(source, args.num_pages, args.seed)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        print(f"make_korquad2_sample.py: error: --source {args.source}: not a usable KorQuAD v1.0 file "
              f"({type(error).__name__}: {error})", file=sys.stderr)
        return 1
    for path in write_split(documents, Path(args.output_dir), args.train_files):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
