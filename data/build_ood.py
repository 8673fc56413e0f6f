"""Rebuild the out-of-domain test sets (data/ood/): CLDR language and unit names (babel) and Debian's translated package
descriptions (DDTP), parallel across the demo's languages, none of it seen by training on data/emoji."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import babel
from babel import Locale
from babel.core import get_cldr_version

HERE = Path(__file__).resolve().parent
OUT = HERE / "ood"
EMOJI_TRAIN = HERE / "emoji" / "train.jsonl"  # what the demo student is trained on: the OOD sets must not repeat it
LANGUAGES = ("en", "es", "ja", "ko", "pt", "it", "fr", "de", "fa", "id", "zh", "ru", "tr", "ar")  # as data/emoji
UNSPACED = ("ja", "zh")  # no spaces between words: overlap is measured on characters there
CLDR_FILES = ("cldr_languages.jsonl", "cldr_units.jsonl")
DDTP_FILE = "ddtp.jsonl"

# DDTP: the Debian archive's i18n/Translation-<lang> files, as apt stores them after
#   apt-get update -o Acquire::Languages=en,de,fr,es,it,ja,ko,ru,pt,pt_BR,zh_CN
DDTP_LISTS = Path("/var/lib/apt/lists")
DDTP_SUITE = "bookworm"
# mclip code -> Debian locales, first choice first: CLDR's "pt" (data/emoji's Portuguese) is Brazilian Portuguese
DDTP_LANGUAGES = {
    "es": ("es",),
    "ja": ("ja",),
    "ko": ("ko",),
    "pt": ("pt_BR", "pt"),
    "it": ("it",),
    "fr": ("fr",),
    "de": ("de",),
    "zh": ("zh_CN",),
    "ru": ("ru",),
}  # none for fa, id, tr, ar
DDTP_ROWS = 600  # rows kept, the descriptions translated into the most languages first; bounds the file's size
DDTP_SALT = "mclip-ood-ddtp-v1"  # orders descriptions of equal coverage; changing it changes the selection

LICENCE_CLDR = (
    "Unicode License v3 (https://www.unicode.org/license.txt): CLDR data (c) Unicode, Inc., "
    "as carried by babel (BSD-3-Clause, (c) the Babel Team)"
)
LICENCE_DDTP = (
    "not established: no licence is stated for DDTP translations; each English text is part of the "
    "debian/control of a package in Debian main (DFSG-free, under that package's licence), and Debian "
    "redistributes the translations on its mirrors; see data/README.md"
)


# ---- text and overlap with the training captions ----


def clean(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def padded(text: str, lang: str) -> str:
    """The form whose substrings are whole-word matches: " w1 w2 " (case-folded text for unspaced scripts)."""
    return text.casefold() if lang in UNSPACED else f" {' '.join(words(text))} "


class Training:
    """The training captions per language (data/emoji/train.jsonl), for the leak check and the overlap figures."""

    def __init__(self, path: Path = EMOJI_TRAIN):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        self.ids = {row["id"] for row in rows}
        self.captions = {lang: [row[column(lang)] for row in rows] for lang in LANGUAGES}
        self.padded = {lang: [padded(c, lang) for c in caps if words(c)] for lang, caps in self.captions.items()}
        self.joined = {lang: "\n".join(c.casefold() for c in caps) for lang, caps in self.captions.items()}
        self.vocab = {lang: {w for c in caps for w in words(c)} for lang, caps in self.captions.items()}

    def leaks(self, text: str, lang: str = "en") -> bool:
        """The text occurs inside some training caption of its language, case-folded, even inside a word: "Japanese" in
        "Japanese castle", "German" in "flag Germany", "Deutsch" in "flagge deutschland". Training saw it in context."""
        return text.casefold() in self.joined[lang]

    def overlap(self, rows: list[dict], lang: str) -> dict:
        """How much of one language's OOD captions training already saw: captions inside a training caption (as
        `leaks`), captions containing a whole training caption ("camera" in "gphoto2 digital camera library"), and the
        share of their words (characters for ja/zh) in the training vocabulary."""
        texts = [row[column(lang)] for row in rows if row.get(column(lang))]
        if not texts:
            return {"captions": 0}
        inside = sum(self.leaks(t, lang) for t in texts)
        covering = sum(any(c in padded(t, lang) for c in self.padded[lang]) for t in texts)
        if lang in UNSPACED:
            chars = [ch for t in texts for ch in t if ch.isalnum()]
            seen = {ch for c in self.captions[lang] for ch in c}
            share = sum(ch in seen for ch in chars) / len(chars)
        else:
            tokens = [w for t in texts for w in words(t)]
            share = sum(w in self.vocab[lang] for w in tokens) / len(tokens)
        return {
            "captions": len(texts),
            "inside_a_training_caption": inside,
            "containing_a_training_caption": covering,
            "unit": "character" if lang in UNSPACED else "word",
            "share_in_training_vocab": round(share, 4),
        }


def column(lang: str) -> str:
    return "caption" if lang == "en" else f"caption_{lang}"


def clear_leaks(rows: list[dict], languages: tuple[str, ...], training: Training) -> dict[str, int]:
    """A caption found inside a training caption of its language (Indonesian "Jerman" is German and Germany, seen in
    "bendera Jerman"; German "Deutsch" is in "flagge deutschland") is something training saw: it is cleared (None)
    from the row. Returns the count per language."""
    cleared = {}
    for lang in languages:
        hits = [row for row in rows if row.get(column(lang)) is not None and training.leaks(row[column(lang)], lang)]
        for row in hits:
            row[column(lang)] = None
        cleared[lang] = len(hits)
    return cleared


def unambiguous(rows: list[dict], languages: tuple[str, ...]) -> dict[str, int]:
    """Two rows with one case-folded caption in a language cannot both be retrieved right: the later row (by id) loses
    that language (set to None). Returns how many captions were cleared per language."""
    cleared = {}
    for lang in languages:
        seen, count = set(), 0
        for row in rows:
            text = row.get(column(lang))
            if text is None:
                continue
            if text.casefold() in seen:
                row[column(lang)] = None
                count += 1
            seen.add(text.casefold())
        cleared[lang] = count
    return cleared


# ---- CLDR (babel) ----


def cldr_table(category: str) -> dict[str, dict[str, str]]:
    """lang -> code -> name for one CLDR category, for the codes every one of the 14 locales names."""
    tables = {}
    for lang in LANGUAGES:
        locale = Locale.parse(lang)
        if category == "languages":
            tables[lang] = dict(locale.languages)
        else:  # units: the long display name ("kilometers per hour")
            tables[lang] = {
                key: names["long"] for key, names in locale._data["unit_display_names"].items() if names.get("long")
            }
    common = set.intersection(*(set(t) for t in tables.values()))
    return {lang: {code: clean(tables[lang][code]) for code in common} for lang in LANGUAGES}


def keep_code(category: str, code: str, english: str) -> bool:
    if category == "languages":
        # regional variants carry territory names ("Austrian German", "Swiss High German") and scripts ("Simplified
        # Chinese"): territory names are flag captions in the training data
        return "_" not in code
    return "[" not in english  # units: CLDR marks Japan-only units "[JP]"


def build_cldr(category: str, prefix: str, training: Training) -> tuple[list[dict], dict]:
    """One row per CLDR code named in all 14 languages, minus regional variants, English duplicates and leaks."""
    table = cldr_table(category)
    dropped = {"variant_or_marked": 0, "duplicate_english": 0, "english_inside_a_training_caption": []}
    rows, seen = [], set()
    for code in sorted(table["en"]):
        english = table["en"][code]
        if not keep_code(category, code, english):
            dropped["variant_or_marked"] += 1
            continue
        if english.casefold() in seen:  # two codes with one English name would share one teacher target
            dropped["duplicate_english"] += 1
            continue
        seen.add(english.casefold())
        if training.leaks(english):  # "Japanese" is in "Japanese castle", "Thai" in "flag Thailand": training saw it
            dropped["english_inside_a_training_caption"].append(english)
            continue
        rows.append({"id": f"{prefix}-{code}", **{column(lang): table[lang][code] for lang in LANGUAGES}})
    rows.sort(key=lambda row: row["id"])
    dropped["caption_inside_a_training_caption"] = clear_leaks(rows, LANGUAGES[1:], training)
    dropped["ambiguous_caption"] = unambiguous(rows, LANGUAGES[1:])
    return rows, dropped


# ---- DDTP (Debian's package descriptions) ----


def ddtp_files(lists: Path, suite: str) -> dict[str, Path]:
    """Debian locale -> the suite's main Translation file (lz4 or plain) in the apt lists folder."""
    found = {}
    for locale in ["en"] + sorted({loc for locs in DDTP_LANGUAGES.values() for loc in locs}):
        name = f"_debian_dists_{suite}_main_i18n_Translation-{locale.replace('_', '%5f')}"
        matches = sorted(p for p in lists.glob(f"*{name}*") if p.name.endswith((name, name + ".lz4")))
        if len(matches) > 1:
            raise SystemExit(f"build_ood: more than one {name} in {lists}: {', '.join(p.name for p in matches)}")
        if matches:
            found[locale] = matches[0]
    if "en" not in found:
        raise SystemExit(
            f"build_ood: no Translation-en for {suite} in {lists}; run\n"
            "  apt-get update -o Acquire::Languages=en,de,fr,es,it,ja,ko,ru,pt,pt_BR,zh_CN\n"
            "(apt-get install lz4 too), or pass --skip-ddtp to build the CLDR files only"
        )
    return found


def read_text(path: Path) -> str:
    if path.suffix != ".lz4":
        return path.read_text(encoding="utf-8")
    if not shutil.which("lz4"):
        raise SystemExit("build_ood: the lz4 command is missing; apt-get install lz4")
    return subprocess.run(["lz4", "-dc", str(path)], check=True, capture_output=True).stdout.decode("utf-8")


def short_descriptions(text: str) -> dict[str, str]:
    """Description-md5 -> the first line (the short description) of each block of a Translation file."""
    out, md5 = {}, None
    for line in text.splitlines():
        if line.startswith("Description-md5:"):
            md5 = line.split(":", 1)[1].strip()
        elif line.startswith("Description-") and md5:
            out.setdefault(md5, clean(line.split(":", 1)[1]))
            md5 = None
    return out


def build_ddtp(lists: Path, suite: str, training: Training) -> tuple[list[dict], dict]:
    """Rows of English short descriptions with their human translations, joined by Description-md5."""
    files = ddtp_files(lists, suite)
    by_locale = {locale: short_descriptions(read_text(path)) for locale, path in files.items()}
    english = by_locale["en"]
    dropped = {
        "untranslated_copy": {lang: 0 for lang in DDTP_LANGUAGES},
        "duplicate_english": 0,
        "english_inside_a_training_caption": [],
    }
    candidates = {}  # case-folded English -> the row of its best-covered md5
    source = {}  # (md5, lang) -> the Debian locale its caption came from
    for md5 in sorted(english):
        row = {"id": f"ddtp-{md5}", "caption": english[md5]}
        for lang, locales in DDTP_LANGUAGES.items():
            locale = next((loc for loc in locales if md5 in by_locale.get(loc, {})), None)
            text = by_locale[locale][md5] if locale else None
            source[md5, lang] = locale
            if text is not None and text.casefold() == english[md5].casefold():
                dropped["untranslated_copy"][lang] += 1  # the English left in place, not a translation
                text = None
            row[column(lang)] = text
        n = sum(row[column(lang)] is not None for lang in DDTP_LANGUAGES)
        if n == 0:
            continue
        key = english[md5].casefold()
        if key in candidates:
            dropped["duplicate_english"] += 1
            if n <= candidates[key][0]:
                continue
        candidates[key] = (n, row)
    kept = []
    for n, row in candidates.values():
        if training.leaks(row["caption"]):
            dropped["english_inside_a_training_caption"].append(row["caption"])
            continue
        kept.append((-n, hashlib.sha256(f"{DDTP_SALT}:{row['id']}".encode()).hexdigest(), row))
    rows = sorted((row for *_, row in sorted(kept, key=lambda k: k[:2])[:DDTP_ROWS]), key=lambda row: row["id"])
    dropped["not_selected"] = len(kept) - len(rows)
    dropped["caption_inside_a_training_caption"] = clear_leaks(rows, tuple(DDTP_LANGUAGES), training)
    dropped["ambiguous_caption"] = unambiguous(rows, tuple(DDTP_LANGUAGES))
    order = [lang for lang in LANGUAGES if lang == "en" or lang in DDTP_LANGUAGES]
    rows = [{"id": row["id"], **{column(lang): row[column(lang)] for lang in order}} for row in rows]
    from_locale = {
        lang: {
            loc: sum(row[column(lang)] is not None and source[row["id"][len("ddtp-") :], lang] == loc for row in rows)
            for loc in locales
        }
        for lang, locales in DDTP_LANGUAGES.items()
        if len(locales) > 1
    }
    inputs = {
        locale: {
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "descriptions": len(by_locale[locale]),
        }
        for locale, path in files.items()
    }
    return rows, {"dropped": dropped, "captions_from_locale": from_locale, "inputs": inputs}


# ---- writing ----


def entry(rows: list[dict], languages: tuple[str, ...], training: Training, **fields) -> dict:
    return {
        **fields,
        "languages": list(languages),
        "columns": list(rows[0]),
        "rows": len(rows),
        "captions": {lang: sum(row.get(column(lang)) is not None for row in rows) for lang in languages},
        "overlap_with_training": {lang: training.overlap(rows, lang) for lang in languages},
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))


def build(out: Path, skip_ddtp: bool = False, lists: Path = DDTP_LISTS, suite: str = DDTP_SUITE) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    training = Training()
    meta = {
        "training_captions": "data/emoji/train.jsonl",
        "babel_version": babel.__version__,
        "cldr_version": get_cldr_version(),
        "files": {},
    }
    for name, category, prefix in (
        ("cldr_languages.jsonl", "languages", "cldr-lang"),
        ("cldr_units.jsonl", "units", "cldr-unit"),
    ):
        rows, dropped = build_cldr(category, prefix, training)
        assert not training.ids & {row["id"] for row in rows}, "an OOD id collides with an emoji id"
        write_jsonl(out / name, rows)
        meta["files"][name] = entry(
            rows,
            LANGUAGES,
            training,
            source=f"CLDR {get_cldr_version()} {category} names via babel {babel.__version__}",
            licence=LICENCE_CLDR,
            dropped=dropped,
        )
    previous = out / "meta.json"
    if not skip_ddtp:
        rows, info = build_ddtp(lists, suite, training)
        write_jsonl(out / DDTP_FILE, rows)
        languages = ("en",) + tuple(lang for lang in LANGUAGES if lang in DDTP_LANGUAGES)
        meta["files"][DDTP_FILE] = entry(
            rows,
            languages,
            training,
            source=f"Debian {suite} main, i18n/Translation-* (DDTP), first line of each description",
            licence=LICENCE_DDTP,
            locales={lang: list(locs) for lang, locs in DDTP_LANGUAGES.items()},
            salt=DDTP_SALT,
            max_rows=DDTP_ROWS,
            **info,
        )
    elif previous.exists() and (out / DDTP_FILE).exists():  # the CLDR part alone keeps the folder's DDTP record
        kept = json.loads(previous.read_text(encoding="utf-8")).get("files", {}).get(DDTP_FILE)
        if kept:
            meta["files"][DDTP_FILE] = kept
    previous.write_bytes((json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument(
        "--skip-ddtp", action="store_true", help="build the CLDR files only (needs babel, no apt lists)"
    )
    parser.add_argument(
        "--lists",
        type=Path,
        default=DDTP_LISTS,
        help=f"apt lists folder with the Translation files (default {DDTP_LISTS})",
    )
    parser.add_argument(
        "--suite", default=DDTP_SUITE, help=f"Debian suite of the Translation files (default {DDTP_SUITE})"
    )
    args = parser.parse_args(argv)
    meta = build(args.out, args.skip_ddtp, args.lists, args.suite)
    print(f"babel {meta['babel_version']} (CLDR {meta['cldr_version']}) -> {args.out}")
    for name, info in meta["files"].items():
        per_lang = " ".join(f"{lang} {n}" for lang, n in info["captions"].items())
        print(f"  {name:<22} {info['rows']:>5} rows; captions: {per_lang}")


if __name__ == "__main__":
    main()
