"""Tests for hnet/scripts.py (causal per-byte script routing)."""

import random
import time

import numpy as np
import pytest
import regex

from hnet import scripts as sc

LAT, CYR, IND, OTH = 0, 1, 2, 3
MIXED = "Hello мир 123, नमस्ते! বাংলা తెలుగు e\u0301 «中文» ok. Ж\u0301x 😀 ΑΒ।"


def _char_routes_reference(text: str, groups=sc.SCRIPT_GROUPS, default=0) -> list[int]:
    """Character-level reference: own group by regex, Common/Inherited inherit the previous route."""
    catch_all = [i for i, v in enumerate(groups.values()) if not v][0]
    out, prev = [], default
    for ch in text:
        if regex.match(r"[\p{Script=Common}\p{Script=Inherited}]", ch):
            r = prev
        else:
            r = catch_all
            for gi, scripts in enumerate(groups.values()):
                if any(regex.match(r"\p{Script=%s}" % s, ch) for s in scripts):
                    r = gi
        out.append(r)
        prev = r
    return out


def test_groups_and_names():
    assert sc.route_names() == ["latin", "cyrl", "deva", "other"] and sc.num_routes() == 4
    for s in ("Devanagari", "Bengali", "Telugu"):
        assert s in sc.SCRIPT_GROUPS["deva"]
    with pytest.raises(ValueError):
        sc.byte_routes(b"x", {"latin": ("Latin",)})  # no catch-all
    with pytest.raises(ValueError):
        sc.byte_routes(b"x", {"a": ("Latin",), "b": ("Latin",), "o": ()})


def test_mixed_script_last_byte_matches_char_reference():
    data = MIXED.encode()
    routes = sc.byte_routes(data)
    assert routes.dtype == np.int32 and routes.shape == (len(data),)
    ref = _char_routes_reference(MIXED)
    pos, prev = 0, 0
    for ch, r in zip(MIXED, ref):
        n = len(ch.encode())
        assert routes[pos + n - 1] == r, (ch, routes[pos: pos + n], r)
        # earlier bytes of the char: its own route (identified early) or the previous route
        assert all(x in (r, prev) for x in routes[pos: pos + n - 1]), ch
        pos, prev = pos + n, r


def test_mixed_script_explicit():
    def at(s, k=0):  # byte routes of the k-th occurrence of substring s
        b, start = s.encode(), 0
        for _ in range(k + 1):
            i = MIXED.encode().index(b, start)
            start = i + 1
        return list(routes[i: i + len(b)])

    routes = sc.byte_routes(MIXED.encode())
    assert at("Hello ") == [LAT] * 6
    assert at("мир") == [CYR] * 6  # lead 0xD0/0xD1 already identifies Cyrillic
    assert at(" 123, ") == [CYR] * 6  # Common chars inherit
    # "न" = E0 A4 A8 after a Cyrillic-routed space: the lead 0xE0 is ambiguous -> previous route
    assert at("न") == [CYR, IND, IND]
    assert at("! ") == [IND, IND]
    assert set(at("বাংলা తెలుగు")) == {IND}
    assert at("e\u0301") == [LAT, LAT, LAT]  # combining acute inherits from 'e'
    assert at("«") == [LAT, LAT]
    # "中" = E4 B8 AD: lead E4 (U+4000..4FFF) also covers Common Yijing symbols -> previous
    assert at("中") == [LAT, OTH, OTH]
    assert at("Ж\u0301") == [CYR, CYR, CYR, CYR]
    assert at("😀") == [LAT] * 4  # emoji are Common (after "x ")
    assert at("ΑΒ") == [LAT, OTH, OTH, OTH]  # Greek: lead 0xCE is ambiguous (U+0380.. has Common)
    assert at("।") == [OTH] * 3  # danda is Common


def test_invalid_bytes_and_framing():
    r = sc.byte_routes(b"\xfe\xd0\xbcx\xd0A\x80\xe0\xa4B\xff")
    #                  BOS  м       x   D0 A  80  E0  A4  B  EOS
    assert list(r) == [0, CYR, CYR, LAT, CYR, LAT, LAT, LAT, IND, LAT, LAT]
    assert sc.byte_routes(b"").shape == (0,)
    assert list(sc.byte_routes(b"  x", default_route=2)) == [2, 2, LAT]


def _random_docs(n, seed):
    rnd = random.Random(seed)
    alpha = list("abcXYZ019 _,.;:'-!?\n") + ["ü", "é", "×", "ж", "Д", "क", "ि", "्", "।", "ব", "ত", "తె", "中",
                                              "文", "😀", "\u0301", "—", "ა", "Ω", "\u4dc0"]
    docs = []
    for _ in range(n):
        d = "".join(rnd.choice(alpha) for _ in range(rnd.randint(1, 25))).encode()
        for _ in range(rnd.choice([0, 0, 1, 2])):
            i = rnd.randint(0, len(d))
            d = d[:i] + bytes([rnd.choice([0x80, 0xA4, 0xE0, 0xF0, 0xFF, 0xFE, 0xD0, 0xE4])]) + d[i:]
        docs.append(d)
    return docs


def test_causality_every_byte_prefix():
    """Routes of d[:k] == first k routes of d, for every k, including cuts inside a character."""
    n_mid = 0
    for d in [MIXED.encode()] + _random_docs(150, seed=0):
        full = sc.byte_routes(d)
        for k in range(len(d) + 1):
            np.testing.assert_array_equal(sc.byte_routes(d[:k]), full[:k], err_msg=f"{d!r} k={k}")
            n_mid += 0 < k < len(d) and 0x80 <= d[k] <= 0xBF
    assert n_mid > 100


def test_speed_one_megabyte():
    sc.byte_routes(b"warm-up")  # tables are built once per grouping
    big = ("Hello мир नमस्ते বাংলা 中文 123, ok! " * 16000).encode() + b"\xff\xe0"
    t0 = time.perf_counter()
    r = sc.byte_routes(big)
    dt = time.perf_counter() - t0
    assert r.shape == (len(big),) and len(big) > 900_000
    assert dt < 5.0, dt


NTREX_SCRIPT = {"eng": "latin", "spa": "latin", "fra": "latin", "deu": "latin", "vie": "latin", "rus": "cyrl",
                "ukr": "cyrl", "bel": "cyrl", "ell": "grek", "arb": "arab", "heb": "hebr", "hin": "deva",
                "ben": "beng", "tel": "telu", "tam": "taml", "zho-CN": "hani", "jpn": "kana", "kor": "hang",
                "tha": "thai", "amh": "ethi", "kat": "geor", "hye": "armn"}


@pytest.mark.shared_data
def test_ntrex_groups_route_every_language_to_its_own_script():
    """No NTREX language falls into the catch-all: the first valid line of each is >= 90 % its script's
    route (jpn: han + kana)."""
    from tests.helpers import shared_text_path

    g = sc.NTREX_SCRIPT_GROUPS
    names = sc.route_names(g)
    assert names[-1] == "other" and not g["other"] and sc.GROUPINGS["ntrex"] is g
    for lang, want in NTREX_SCRIPT.items():
        with open(shared_text_path("ntrex128", "valid", f"{lang}.txt"), "rb") as f:
            line = f.read().split(b"\n")[0]
        n_R = sc.route_counts([line], g)[0]
        own = n_R[names.index(want)] + (n_R[names.index("hani")] if lang == "jpn" else 0)
        assert names[int(n_R.argmax())] == want and own >= 0.9 * len(line), (lang, dict(zip(names, n_R)))


def test_parity_priors_hand_values():
    """eng 100 latin bytes, fra 120 latin, rus 200 cyrl (same content): π_latin = 220 / (100 + 100) = 1.1,
    π_cyrl = 2, c = 0.2 · 1.1 = 0.22 -> α = (0.2, 0.11, c = 0.22 for the absent route)."""
    counts = np.array([[100, 0, 0], [120, 0, 0], [0, 200, 0]])
    a = sc.parity_priors(counts, english_index=0, alpha_english=0.2)
    np.testing.assert_allclose(a, [0.2, 0.11, 0.22], rtol=1e-12)
    np.testing.assert_allclose(counts @ a, [20.0, 24.0, 22.0], rtol=1e-12)  # expected chunks
    # languages that share no route with another premium get exactly equal chunks per English byte
    counts = np.array([[0, 100, 0], [250, 0, 0], [0, 0, 180]])
    chunks = counts @ sc.parity_priors(counts, english_index=1, alpha_english=0.25)
    np.testing.assert_allclose(chunks, [62.5, 62.5, 62.5], rtol=1e-12)


def test_route_counts():
    text = "ab мир".encode()  # a b ␣ (latin) м и р (2 bytes each)
    np.testing.assert_array_equal(sc.route_counts([text, b"x"]), [[3, 6, 0, 0], [1, 0, 0, 0]])


# ------------------------------------------------------------------------------------------------
# Leave-scripts-out groupings and the catch-all's UTF-8 length classes (issue 19)
# ------------------------------------------------------------------------------------------------

UNSEEN = {  # unseen script -> UTF-8 bytes per letter
    "ગુજરાતી": 3, "ಕನ್ನಡ": 3, "ខ្មែរ": 3, "မြန်မာ": 3, "ქართული": 3, "አማርኛ": 3, "ไทย": 3, "Հայերեն": 2, "𐌰𐌱𐌲": 4}
LSO_DOC = "Hello мир, " + " ".join(UNSEEN) + " हिन्दी 中文 ok."


def test_utf8_class_causality_every_byte_prefix():
    """The length classes keep the prefix rule: routes of d[:k] == first k routes of d, cuts inside characters
    included, on unseen scripts of every length and the random mixed documents."""
    g = sc.NTREX_LSO_UTF8_GROUPS
    n_mid = 0
    for d in [LSO_DOC.encode()] + _random_docs(100, seed=1):
        full = sc.byte_routes(d, g)
        for k in range(len(d) + 1):
            np.testing.assert_array_equal(sc.byte_routes(d[:k], g), full[:k], err_msg=f"{d!r} k={k}")
            n_mid += 0 < k < len(d) and 0x80 <= d[k] <= 0xBF
    assert n_mid > 100


def test_unseen_scripts_land_on_their_utf8_length_class():
    """Under 'ntrex_lso_utf8' every letter of an unseen script closes on the class of its UTF-8 length (and the
    space after it inherits it), seen scripts keep their routes; under 'ntrex_lso' all unseen go to 'other'."""
    cls = {2: "other2", 3: "other3", 4: "other4"}
    for grouping, name_of in (("ntrex_lso_utf8", cls.get), ("ntrex_lso", lambda n: "other")):
        g = sc.GROUPINGS[grouping]
        names = sc.route_names(g)
        d = LSO_DOC.encode()
        r = sc.byte_routes(d, g)
        for word, n in UNSEEN.items():
            i = d.index(word.encode())
            w = r[i:i + len(word.encode())]
            ends = [j + len(word[:c + 1].encode()) - 1 for j in [0] for c in range(len(word))]
            assert {names[x] for x in w[ends]} == {name_of(n)}, (grouping, word, [names[x] for x in w])
            assert names[r[i + len(word.encode())]] == name_of(n)  # the following space inherits
        for word, want in (("мир", "cyrl"), ("हिन्दी", "deva"), ("中文", "hani"), ("ok", "latin")):
            i = d.index(word.encode())
            assert names[r[i + len(word.encode()) - 1]] == want
    # a prefix decides the class before the character ends: E0 AA = U+0A80..U+0ABF is all Gujarati
    g = sc.NTREX_LSO_UTF8_GROUPS
    assert sc.route_names(g)[sc.byte_routes("ab".encode() + "ગ".encode()[:2], g)[-1]] == "other3"
    assert sc.route_names(g)[sc.byte_routes("ab".encode() + "ગ".encode()[:1], g)[-1]] == "latin"  # E0: mixed


def test_utf8_class_groupings_are_validated():
    with pytest.raises(ValueError, match="mixes"):
        sc.byte_routes(b"a", {"latin": ("Latin",), "x": ("Greek", "utf8-2"), "other": ()})
    with pytest.raises(ValueError, match="is in groups"):
        sc.byte_routes(b"a", {"latin": ("Latin",), "a": ("utf8-3",), "b": ("utf8-3",), "other": ()})
    # the existing groupings have no length classes: every unseen script still goes to the one catch-all
    assert all(not any(s.startswith("utf8-") for v in sc.GROUPINGS[k].values() for s in v) for k in ("magnet", "ntrex"))


def test_char_lengths_and_route_length_counts():
    d = "aé中😀".encode() + b"\xff"
    np.testing.assert_array_equal(sc.char_lengths(d), [1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 1])
    # magnet groups; 中's lead byte E4 also covers Common U+4DC0.. so it keeps the previous route (latin)
    c = sc.route_length_counts(["ab мир".encode(), "x中".encode()])
    np.testing.assert_array_equal(c, [[4, 0, 1, 0], [0, 6, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]])


def test_length_class_priors_hand_values():
    """Routes: A 1-byte (α .2), B and C 2-byte (α .1 with 300 bytes, .16 with 100), D 3-byte (α .09), E no bytes.
    α_2 = (.1·300 + .16·100) / 400 = .115, α_3 = .09, α_4 = .09 · 3/4 (no 4-byte route seen)."""
    priors = [0.2, 0.1, 0.16, 0.09, 0.3]
    counts = [[500, 20, 0, 0], [30, 270, 0, 0], [10, 90, 0, 0], [40, 0, 200, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(sc.length_class_priors(priors, counts), [0.115, 0.09, 0.0675], rtol=1e-12)
    np.testing.assert_allclose(sc.length_class_priors(priors, counts, (1,)), [0.2], rtol=1e-12)
    # no 2-byte route: the 1-byte α halves
    np.testing.assert_allclose(sc.length_class_priors([0.2], [[10, 0, 0, 0]], (2, 3)), [0.1, 0.2 / 3], rtol=1e-12)
