"""Rebuild the bundled emoji caption set (data/emoji/) from the CLDR emoji names that the `emoji` package carries."""

from __future__ import annotations

import argparse
import hashlib
import json
import unicodedata
from pathlib import Path

import emoji

LANGUAGES = ("en", "es", "ja", "ko", "pt", "it", "fr", "de", "fa", "id", "zh", "ru", "tr", "ar")
TEST_SIZE = 300  # concepts; the demo's retrieval table is read on these
VALIDATION_SIZE = 200  # concepts; for tuning, so the test split stays unseen
SPLIT_SALT = "mclip-emoji-split-v1"  # changing it reshuffles the splits
SPLITS = ("train", "validation", "test")
OUT = Path(__file__).resolve().parent / "emoji"

SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))  # U+1F3FB..U+1F3FF Fitzpatrick modifiers
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAGS = range(0xE0020, 0xE0080)  # subdivision flags: black flag + tag letters (England, Scotland, Wales)

# emoji's Russian names lost the breve of "й" in some words (emoji PR #277 replaced "й" by "и" to get names
# past its slug code); these are the mangled words in the names it carries, put back as CLDR spells them.
RU_SHORT_I = {
    "архивныи": "архивный",
    "белыи": "белый",
    "бородатыи": "бородатый",
    "вопросительныи": "вопросительный",
    "восклицательныи": "восклицательный",
    "восковои": "восковой",
    "гаечныи": "гаечный",
    "глухои": "глухой",
    "гоночныи": "гоночный",
    "гостиничныи": "гостиничный",
    "густои": "густой",
    "джоистик": "джойстик",
    "другои": "другой",
    "женскии": "женский",
    "заброшенныи": "заброшенный",
    "зарегистрированныи": "зарегистрированный",
    "лаинер": "лайнер",
    "латинскии": "латинский",
    "маленькии": "маленький",
    "медицинскии": "медицинский",
    "мужскои": "мужской",
    "нахмурившиися": "нахмурившийся",
    "национальныи": "национальный",
    "ночнои": "ночной",
    "обиженныи": "обиженный",
    "острыи": "острый",
    "пассажирскии": "пассажирский",
    "перегонныи": "перегонный",
    "перекиднои": "перекидной",
    "перьевои": "перьевой",
    "пиратскии": "пиратский",
    "пляжныи": "пляжный",
    "поднятои": "поднятой",
    "полицеискии": "полицейский",
    "поцелуи": "поцелуй",
    "православныи": "православный",
    "предыдущии": "предыдущий",
    "радужныи": "радужный",
    "рукои": "рукой",
    "синтоистскии": "синтоистский",
    "слаидер": "слайдер",
    "следующии": "следующий",
    "слепои": "слепой",
    "снежнои": "снежной",
    "старинныи": "старинный",
    "строика": "стройка",
    "студииныи": "студийный",
    "супергерои": "супергерой",
    "суперзлодеи": "суперзлодей",
    "таимер": "таймер",
    "товарныи": "товарный",
    "указательныи": "указательный",
    "черныи": "черный",
    "шапкои": "шапкой",
    "штангои": "штангой",
}


def concept_id(glyph: str) -> str:
    """Hex code points joined by '-' ("1f9cd-200d-2640-fe0f"): stable across name changes, and gives the glyph back."""
    return "-".join(f"{ord(c):04x}" for c in glyph)


def is_country_flag(glyph: str) -> bool:
    return all(ord(c) in REGIONAL_INDICATORS for c in glyph) or any(ord(c) in TAGS for c in glyph)


def caption(name: str, lang: str, glyph: str) -> str:
    """`:stehende_frau:` -> `stehende frau`: the package's slug back to a plain phrase."""
    text = unicodedata.normalize("NFC", name.strip(":").replace("_", " "))
    text = " ".join(text.split())
    if lang == "ru":
        text = " ".join("-".join(RU_SHORT_I.get(part, part) for part in word.split("-")) for word in text.split(" "))
    if lang == "en" and is_country_flag(glyph):
        # CLDR's English name is "flag: France" and the other languages keep their "flag"; the package drops it
        text = f"flag {text}"
    return text


def collect() -> tuple[list[dict], dict]:
    """One row per fully-qualified emoji without a skin tone, named in every language; and what was dropped why."""
    for lang in LANGUAGES:
        emoji.config.load_language(lang)
    dropped = {
        "not_fully_qualified": 0,
        "skin_tone": 0,
        "missing_language": {lang: 0 for lang in LANGUAGES},
        "duplicate_english_caption": 0,
    }
    rows, seen = [], {}
    for glyph in sorted(emoji.EMOJI_DATA, key=concept_id):
        data = emoji.EMOJI_DATA[glyph]
        # minimally/unqualified forms repeat a fully-qualified concept under the same name; components
        # (skin tones, hair styles) are not pictures on their own
        if data["status"] != emoji.STATUS["fully_qualified"]:
            dropped["not_fully_qualified"] += 1
            continue
        if SKIN_TONES.intersection(glyph):
            dropped["skin_tone"] += 1
            continue
        missing = [lang for lang in LANGUAGES if not data.get(lang)]
        for lang in missing:
            dropped["missing_language"][lang] += 1
        if missing:
            continue
        row = {"id": concept_id(glyph), "caption": caption(data["en"], "en", glyph)}
        row.update({f"caption_{lang}": caption(data[lang], lang, glyph) for lang in LANGUAGES[1:]})
        # two concepts with one English caption share one teacher target: retrieval could not tell them apart
        key = row["caption"].casefold()
        if key in seen:
            dropped["duplicate_english_caption"] += 1
            continue
        seen[key] = row["id"]
        rows.append(row)
    return rows, dropped


def split_rank(concept: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}:{concept}".encode()).hexdigest()


def split(rows: list[dict]) -> dict[str, list[dict]]:
    """Test and validation are the concepts with the lowest salted hashes: independent of any iteration order."""
    assert len(rows) > TEST_SIZE + VALIDATION_SIZE, f"only {len(rows)} concepts"
    ranked = sorted(rows, key=lambda row: (split_rank(row["id"]), row["id"]))
    parts = {
        "test": ranked[:TEST_SIZE],
        "validation": ranked[TEST_SIZE : TEST_SIZE + VALIDATION_SIZE],
        "train": ranked[TEST_SIZE + VALIDATION_SIZE :],
    }
    return {name: sorted(parts[name], key=lambda row: row["id"]) for name in SPLITS}


def write(out: Path, splits: dict[str, list[dict]], dropped: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / f"{name}.jsonl").write_bytes(text.encode("utf-8"))
    meta = {
        "source": "CLDR emoji annotations as carried by the emoji package (PyPI)",
        "emoji_version": emoji.__version__,
        "languages": list(LANGUAGES),
        "columns": ["id", "caption"] + [f"caption_{lang}" for lang in LANGUAGES[1:]],
        "split_salt": SPLIT_SALT,
        "rows": {name: len(rows) for name, rows in splits.items()},
        "dropped": dropped,
    }
    (out / "meta.json").write_bytes((json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    rows, dropped = collect()
    meta = write(args.out, split(rows), dropped)
    print(f"emoji {meta['emoji_version']}: {len(rows)} concepts x {len(LANGUAGES)} languages -> {args.out}")
    for name, count in meta["rows"].items():
        print(f"  {name:<10} {count:>5} rows")
    print(f"  dropped: {json.dumps(dropped)}")


if __name__ == "__main__":
    main()
