"""The KorQuAD 2.x row: pages generated from the dev set, their windows, feature time and memory, and the
gold-span oracle through the HTML map and through decoding."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness import ROOT, benchmark, kq_median_seconds, kq_tokenizer


# --- KorQuAD 2.x (issue 31) ---------------------------------------------------------------

# Published KorQuAD 2.0 sizes (korquad.github.io; read from memory, the site is not reachable here).
KORQUAD2_TRAIN = {"documents": 47_957, "questions": 83_486}


def _korquad2_generator():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_korquad2_sample
    return make_korquad2_sample


def _korquad2_pages(dev: Path, num_pages: int, directory: Path) -> Path:
    """`num_pages` generated KorQuAD 2.x pages from the dev set's articles, in the split-file layout."""
    import json
    generator = _korquad2_generator()
    source = json.loads(dev.read_text(encoding="utf-8"))
    generator.write_split(generator.make_dataset(source, num_pages), directory, train_files=2)
    return directory


def _long_page(dev: Path, min_text_chars: int) -> dict:
    """One generated page whose text is at least `min_text_chars` long: dev articles merged into one."""
    import json
    import random
    generator = _korquad2_generator()
    articles = json.loads(dev.read_text(encoding="utf-8"))["data"]
    merged = {"title": "merged", "paragraphs": []}
    for article in articles:
        merged["paragraphs"] += article["paragraphs"]
        if sum(len(paragraph["context"]) for paragraph in merged["paragraphs"]) >= min_text_chars:
            break
    return generator.make_page(merged, 0, random.Random(0))


@benchmark("korquad2")
def bench_korquad2(args: argparse.Namespace) -> None:
    """KorQuAD 2.x pages generated from the dev set: windows, features time, peak memory, gold-span oracle."""
    import json
    import tempfile
    import tracemalloc
    import numpy as np
    import korquad2
    from korquad_utils import convert_examples_to_features, decode_predictions, gold_logits
    tokenizer = kq_tokenizer()
    settings = {"max_seq_length": 384, "doc_stride": 128, "max_query_length": 64}
    print(f"korquad2_settings: max_seq_length={settings['max_seq_length']} doc_stride={settings['doc_stride']}")
    with tempfile.TemporaryDirectory() as work:
        memory, windows = {}, {}
        for num_pages in (10, 100):
            directory = _korquad2_pages(args.dev, num_pages, Path(work) / f"pages_{num_pages}")
            tracemalloc.start()
            examples = korquad2.read_examples(directory, is_training=True)
            features = convert_examples_to_features(examples, tokenizer, is_training=True, progress=False,
                                                    **settings)
            memory[num_pages] = tracemalloc.get_traced_memory()[1]
            windows[num_pages] = len(features)
            tracemalloc.stop()
            pages = {id(example.page): len(example.page.text) for example in examples}
            print(f"korquad2_pages[{num_pages}]: {len(pages)} pages, {len(examples)} questions, "
                  f"{sum(pages.values()) / len(pages):.0f} text chars per page")
            print(f"korquad2_features_per_page[{num_pages}]: {len(features) / len(pages):.1f} (each question "
                  f"on the page has its own windows)")
            print(f"korquad2_windows_per_question[{num_pages}]: {len(features) / len(examples):.1f}")
            print(f"korquad2_peak_mib[{num_pages}]: {memory[num_pages] / 2**20:.1f}")
            if num_pages == 10:
                predictions, nbest = decode_predictions(examples, features, *gold_logits(features),
                                                        max_answer_length=4096)
                html = korquad2.html_predictions(examples, predictions, nbest)
                decoded = korquad2.score(directory, html)
                mapped = korquad2.score(directory, korquad2.oracle_predictions(examples))
                print(f"korquad2_oracle_map[{num_pages}]: EM {mapped['exact_match']:.2f} F1 {mapped['f1']:.2f}")
                print(f"korquad2_oracle_decoded[{num_pages}]: EM {decoded['exact_match']:.2f} "
                      f"F1 {decoded['f1']:.2f}")
                # A training window holds a question's answer only when both its ends fit in it.
                held = np.unique(features.feature_example[features.feature_positions[:, 0] > 0])
                print(f"korquad2_answers_longer_than_a_window[{num_pages}]: {len(examples) - len(held)} of "
                      f"{len(examples)} (no window holds them whole, so no span model can answer them)")
                # Decoding starts an answer only where its first piece has the most context (as for v1); a long
                # answer whose first piece is best read in a window that cuts its end off comes back shortened.
                held = set(held.tolist())
                shortened = sum(
                    1 for number, example in enumerate(examples)
                    if number in held and html[example.qas_id] != example.html_answer
                    and nbest[example.qas_id][0]["end"] == example.end_char
                    and nbest[example.qas_id][0]["start"] > example.start_char)
                print(f"korquad2_answers_shortened_by_the_max_context_rule[{num_pages}]: {shortened} of "
                      f"{len(examples)}")
        # The feature table grows with windows; a generated page holds all its article's ~45 questions where
        # KorQuAD 2.0 has under 2 per page on far longer pages, so scale per window, not per page.
        per_window = (memory[100] - memory[10]) / (windows[100] - windows[10])
        print(f"korquad2_bytes_per_window: {per_window:.0f} (slope of peak memory from 10 to 100 pages)")

        page = _long_page(args.dev, 50_000)
        path = Path(work) / "long.json"
        path.write_text(json.dumps({"version": "KorQuAD_2.1_sample", "data": [page]}, ensure_ascii=False),
                        encoding="utf-8")
        question = korquad2.read_examples(path, is_training=False)[:1]

        def features_of_page(fresh_tokenizer):
            examples = korquad2.read_examples(path, is_training=False)[:1]
            return convert_examples_to_features(examples, fresh_tokenizer, is_training=False, progress=False, **settings)
        page_windows = len(features_of_page(kq_tokenizer()))
        seconds = kq_median_seconds(features_of_page, prepare=kq_tokenizer)
        print(f"korquad2_long_page: {len(question[0].context_text)} text chars, {len(page['context'])} HTML chars, "
              f"{page_windows} windows per question")
        print(f"korquad2_long_page_features_s: {seconds:.2f} (HTML reading + Mecab + WordPiece + windows, "
              f"fresh tokenizer)")
        estimate = KORQUAD2_TRAIN["questions"] * page_windows * per_window
        print(f"korquad2_train_features_gib_estimate: {estimate / 2**30:.1f} ({KORQUAD2_TRAIN['questions']} "
              f"questions, each on a page like this one; the feature cache memory-maps it)")
