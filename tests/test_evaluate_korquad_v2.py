"""evaluate_korquad_v2.py against a from-scratch reading of the published KorQuAD 2.0 rules."""
import json
import string
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser

import pytest

pytest.importorskip("bs4", reason="the KorQuAD 2.0 metric needs beautifulsoup4")

from conftest import ROOT  # noqa: E402
import evaluate_korquad_v2 as metric  # noqa: E402


class _TextOnly(HTMLParser):
    """The text nodes of a fragment (entities decoded), with the standard library's parser."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)


def reference_normalize(text: str) -> str:
    """The published rules, written independently: text of the HTML, marks to spaces, lower case,
    ASCII punctuation out, every whitespace character out."""
    extractor = _TextOnly()
    extractor.feed(text)
    extractor.close()
    text = "".join(extractor.parts)
    text = text.translate({ord(mark): " " for mark in "'\"《》<>〈〉()‘’"}).lower()
    text = text.translate({ord(mark): None for mark in string.punctuation})
    return "".join(ch for ch in text if not ch.isspace())


def reference_f1(prediction: str, truth: str) -> float:
    p, t = reference_normalize(prediction), reference_normalize(truth)
    same = sum((Counter(p) & Counter(t)).values())
    return 0.0 if same == 0 else 2 * same / (len(p) + len(t))


# (prediction, gold answer text, expected EM, expected F1 or None to take the reference's value)
CASES = [
    ("서울", "서울", 1, 1.0),
    ("서울특별시", "서울", 0, 2 * 2 / 7),
    ("", "서울", 0, 0.0),
    ("", "", 1, 0.0),  # both empty: EM 1, F1 0 under the official arithmetic
    ("부산", "서울", 0, 0.0),
    ("<b>서울</b>", "서울", 1, 1.0),
    ("서울", "<p>서울</p>", 1, 1.0),
    ("<a href=\"/wiki/서울\">서울</a>특별시", "서울특별시", 1, 1.0),
    ("<table><tr><th>인구</th><td>970만</td></tr></table>", "인구 970만", 1, 1.0),
    ("<table><tr><td>1</td><td>2</td></tr><tr><td>3</td></tr></table>", "123", 1, 1.0),
    ("<ul><li>사과</li><li>배</li></ul>", "사과\n배", 1, 1.0),
    ("<ul><li>사과</li><li>배<ul><li>감</li></ul></li></ul>", "사과 배 감", 1, 1.0),
    ("<ol><li>하나</li></ol>", "<ul><li>하나</li><li>둘</li></ul>", 0, None),
    ("AT&amp;T", "AT&T", 1, 1.0),
    ("&lt;반지의 제왕&gt;", "반지의 제왕", 1, 1.0),
    ("&quot;인용&quot;", "인용", 1, 1.0),
    ("1&nbsp;000", "1000", 1, 1.0),
    ("&#54620;&#44397;", "한국", 1, 1.0),
    ("&#xD55C;국", "한국", 1, 1.0),
    ("《삼국사기》", "삼국사기", 1, 1.0),
    ("〈동명왕편〉", "동명왕편", 1, 1.0),
    ("‘한강의 기적’", "한강의 기적", 1, 1.0),
    ("(주)삼성", "주 삼성", 1, 1.0),
    ("'작은따옴표'", "작은따옴표", 1, 1.0),
    ("“큰따옴표”", "큰따옴표", 0, None),  # curly double quotes are not in the published list
    ("「낫표」", "낫표", 0, None),
    ("1,000,000원", "1000000원", 1, 1.0),
    ("3.14", "314", 1, 1.0),
    ("e-mail!", "email", 1, 1.0),
    ("BERT", "bert", 1, 1.0),
    ("ＢＥＲＴ", "bert", 0, 0.0),  # full-width Latin is neither ASCII punctuation nor lower-cased to ASCII
    ("서 울", "서울", 1, 1.0),
    ("서\t울\n", "서울", 1, 1.0),
    ("서\u3000울", "서울", 1, 1.0),
    ("서\xa0울", "서울", 1, 1.0),
    ("   ", "서울", 0, 0.0),
    ("<br/>", "", 1, 0.0),
    ("<p>  </p>", "서울", 0, 0.0),
    ("<div><p>첫 <i>문단</i></p><p>둘째</p></div>", "첫 문단 둘째", 1, 1.0),
    ("<span class=\"x\">가</span><span>나</span>", "가나", 1, 1.0),
    ("가나다라", "다라마바", 0, 2 * 2 / 8),
    ("가가가", "가", 0, 2 * 1 / 4),
    ("<td>1592년</td>", "1592년 임진왜란", 0, None),
    ("임진왜란 (1592년)", "임진왜란 1592년", 1, 1.0),
    ("<sup>[1]</sup>조선", "1조선", 1, 1.0),
    ("조선1", "1조선", 0, 1.0),  # the same characters in another order
    ("<b><i><u>깊은</u></i></b> 중첩", "깊은중첩", 1, 1.0),
    ("<table><caption>표</caption><tr><td>값</td></tr></table>", "표값", 1, 1.0),
    ("x<y", "xy", 1, 1.0),  # a stray "<" stays text under html.parser (lxml would drop "<y")
    ("a > b", "ab", 1, 1.0),
]


def test_there_are_at_least_forty_hand_made_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("prediction,truth,expected_em,expected_f1", CASES)
def test_metric_equals_the_published_rules(prediction, truth, expected_em, expected_f1):
    assert metric.exact_match_score(prediction, truth) == expected_em
    assert metric.exact_match_score(prediction, truth) == float(
        reference_normalize(prediction) == reference_normalize(truth))
    assert metric.f1_score(prediction, truth) == pytest.approx(reference_f1(prediction, truth), abs=1e-12)
    if expected_f1 is not None:
        assert metric.f1_score(prediction, truth) == pytest.approx(expected_f1, abs=1e-12)


def _dataset(questions):
    return {"version": "KorQuAD_2.1", "data": [{
        "title": "문서", "url": "https://ko.wikipedia.org/wiki/문서", "context": "<p>본문</p>",
        "raw_html": "<html><body><p>본문</p></body></html>",
        "qas": [{"id": qid, "question": "질문?", "answer": {"text": text, "answer_start": 3}}
                for qid, text in questions]}]}


def test_cli_reads_a_directory_scores_missing_as_zero_and_prints_the_official_keys(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "korquad2.1_dev_00.json").write_text(
        json.dumps(_dataset([("q1", "<b>서울</b>"), ("q2", "부산")]), ensure_ascii=False), encoding="utf-8")
    (tmp_path / "data" / "korquad2.1_dev_01.json").write_text(
        json.dumps(_dataset([("q3", "대구"), ("q4", "인천")]), ensure_ascii=False), encoding="utf-8")
    (tmp_path / "data" / "notes.txt").write_text("not a dataset", encoding="utf-8")
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({"q1": "서울", "q2": "부산광역시", "q3": "대구"}, ensure_ascii=False),
                           encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / "evaluate_korquad_v2.py"), str(tmp_path / "data"),
                             str(predictions)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores) == {"exact_match", "f1"}
    assert scores["exact_match"] == pytest.approx(100 * 2 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 * 2 / 7 + 1 + 0) / 4)
    assert "Unanswered question q4" in result.stderr

    one_file = subprocess.run([sys.executable, str(ROOT / "evaluate_korquad_v2.py"),
                               str(tmp_path / "data" / "korquad2.1_dev_01.json"), str(predictions)],
                              capture_output=True, text=True, timeout=60)
    assert json.loads(one_file.stdout)["exact_match"] == pytest.approx(50.0)


@pytest.mark.parametrize("make,fragment", [
    (lambda d: None, "holds no .json file"),
    (lambda d: (d / "a.json").write_text("{not json", encoding="utf-8"), "not valid JSON"),
    (lambda d: (d / "a.json").write_text(json.dumps({"data": [{"qas": [{"id": "q", "question": "?"}]}]}),
                                         encoding="utf-8"), "question q: 'answer'"),
])
def test_bad_datasets_are_one_line(tmp_path, make, fragment):
    make(tmp_path)
    predictions = tmp_path / "p.jsn"
    predictions.write_text("{}", encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / "evaluate_korquad_v2.py"), str(tmp_path),
                             str(predictions)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
