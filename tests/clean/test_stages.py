"""The stages on their own: HTML extraction, language ID, the C4 and code heuristics."""

import random

import pytest

from megallama.clean.heuristics import C4Config, c4_filter, code_filter, count_sentences
from megallama.clean.html import html_to_text, looks_like_html
from megallama.clean.langid import LanguageIdentifier, default_model_path
from tests.clean.samples import page, paragraph


def test_html_to_text_drops_markup_scripts_styles_comments_and_decodes_entities():
    html = ("<html><head><title>T</title><script>var hidden = 1;</script></head><body>"
            "<!-- secret comment --><h1>Caf&eacute; &amp; Bar</h1><style>p {color: red}</style>"
            "<p>First   <b>para</b>&nbsp;here.</p><div>Second<br>line &#8364;5 &lt;ok&gt;</div>"
            "<pre>def f():\n    return 1</pre><noscript>enable js</noscript></body></html>")
    text = html_to_text(html)
    assert text.split("\n") == ["Café & Bar", "First para here.", "Second", "line €5 <ok>",
                                "def f():", "    return 1"]
    assert looks_like_html(html) and not looks_like_html("a < b and b > c, plain text")


def test_language_identification_labels_and_filters():
    rng = random.Random(0)
    lid = LanguageIdentifier({"en"}, threshold=0.5)
    for lang in ("en", "de", "fr", "es"):
        got, score = lid.predict(page(rng, lang))
        assert got == lang and score > 0.8
        assert lid.keep(got, score) == (lang == "en")
    assert not lid.keep("en", 0.49)
    assert LanguageIdentifier(None).keep("de", 0.6)
    assert default_model_path().endswith("lid.176.ftz")


def test_language_identifier_pickles_without_its_model():
    import pickle

    lid = LanguageIdentifier({"en"})
    lid.predict("An English sentence that loads the model before pickling it.")
    data = pickle.dumps(lid)
    assert len(data) < 1000  # workers get the path, not the 900 kB model
    assert pickle.loads(data).predict(paragraph(random.Random(1)))[0] == "en"


def test_c4_filter_matches_datatrove_line_rules():
    """datatrove's C4QualityFilter is the reference for the line rules (its sentence count needs
    spaCy, so the sentence minimum is compared separately)."""
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.filters.c4_filters import C4QualityFilter

    rng = random.Random(3)
    extra = ["Short line.", "No terminal punctuation here at all", "Please enable JavaScript to view this page.",
             "We use cookies to improve your experience.", "Wait for it...", "A citation[12] inside a sentence.",
             "Read our privacy policy before you continue.", "x" * 1001 + " is a long word.",
             "Our javascript widget { renders } here.", "The brace { opens a block } here."]
    reference = C4QualityFilter(min_num_sentences=-1)
    ours = C4Config(min_sentences=0)
    for _ in range(30):
        lines = [paragraph(rng, "en", rng.randint(1, 3)) for _ in range(rng.randint(1, 5))]
        lines += rng.sample(extra, rng.randint(0, len(extra)))
        rng.shuffle(lines)
        text = "\n".join(lines)
        doc = DTDocument(text=text, id="x")
        ref_keep = reference.filter(doc)
        got, reason = c4_filter(text, ours)
        assert (reason is None) == (ref_keep is True)
        if reason is None:
            assert got == doc.text


def test_c4_page_rules():
    rng = random.Random(4)
    good = "\n".join(paragraph(rng, "en", 2) for _ in range(3))
    assert c4_filter(good)[1] is None and count_sentences(good) == 6
    assert c4_filter(good + "\nLorem ipsum dolor sit amet.")[1] == "lorem_ipsum"
    assert c4_filter(good + "\nThe function is { return x; } in C.")[1] == "curly_brace"
    assert c4_filter(paragraph(rng, "en", 2))[1] == "too_few_sentences"
    assert c4_filter(good, C4Config(bad_words=frozenset({"bakery", "museum", "city"})))[1] == "bad_words"


@pytest.mark.parametrize("content,reason", [
    ("def f(x):\n    return x + 1\n", None),
    ("x = '" + "a" * 1001 + "'\n", "long_line"),
    ("\n".join(["y = " + "b" * 120] * 5), "long_mean_line"),
    ("{}[]();\n" * 20 + "a = 1\n", "low_alphanumeric"),
    ("  \n\n", "empty"),
])
def test_code_filter(content, reason):
    assert code_filter(content) == reason
