"""Translation English -> Spanish: King James Bible verses -> Reina-Valera 1909 verses.

Data: the SWORD zText modules in Debian's sword-text-kjv (engKJV2006eb) and sword-text-sparv
(spaRV1909eb), fetched with `apt-get download`, checked by sha256, read without installing.
Both use the KJV versification, so verse i of one is verse i of the other; markup (Strong's
numbers, notes, stray USFM markers) and book introductions are stripped, and pairs where either
side is empty are dropped. Split 80/10/10 in blocks of 100 consecutive verses (fixed seed), so
neighbouring verses rarely straddle splits.
Metrics: BLEU and chrF (sacrebleu) of generated translations.
"""

import random
import re
import struct
import zlib

from fm.data import sources

KIND = 'seq2seq'

KJV = sources.DebPackage(
  'sword-text-kjv',
  '14.3-1',
  'sword-text-kjv_14.3-1_all.deb',
  '9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57',
)
RV = sources.DebPackage(
  'sword-text-sparv',
  '2.60-1',
  'sword-text-sparv_2.60-1_all.deb',
  '5c87f9b2bc97457e8a872f5bae7ea7ce59cb3de1dcee73e4d4740451863694cf',
)


def verses(package: sources.DebPackage, module: str) -> list[str]:
  """Every verse of a zText module (Old then New Testament), markup stripped."""
  with open(sources.fetch(package), 'rb') as f:
    data = sources.deb_data(f.read())
  files = {
    m.name.rsplit('/', 1)[-1]: data.extractfile(m).read()
    for m in data.getmembers()
    if f'/ztext/{module.lower()}/' in m.name.lower() and m.isfile()
  }
  out = []
  for testament in ('ot', 'nt'):
    bzs, bzv, bzz = (files[f'{testament}.{ext}'] for ext in ('bzs', 'bzv', 'bzz'))
    blocks = {}
    for i in range(len(bzv) // 10):
      block, offset, size = struct.unpack('<IIH', bzv[10 * i : 10 * i + 10])
      if block not in blocks:
        start, length, _ = struct.unpack('<III', bzs[12 * block : 12 * block + 12])
        blocks[block] = zlib.decompress(bzz[start : start + length])
      text = blocks[block][offset : offset + size].decode('utf-8', 'replace')
      if re.search(r'<div\b[^>]*type="book', text):  # A book's introduction: titles, no verse.
        text = ''
      text = re.sub(r'<note\b.*?</note>', '', text, flags=re.S)
      text = re.sub(r'\\[a-z]+\*?', '', text)  # Stray USFM character markers ("\nd LORD").
      out.append(' '.join(re.sub(r'<[^>]*>', '', text).split()))
  return out


def load(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
  english, spanish = verses(KJV, 'engKJV2006eb'), verses(RV, 'spaRV1909eb')
  pairs = [(e, s) for e, s in zip(english, spanish) if e and s]
  blocks = list(range(-(-len(pairs) // 100)))
  random.Random(seed).shuffle(blocks)
  cut = [round(len(blocks) * f) for f in (0.8, 0.9)]
  split_of = {
    b: 'train' if i < cut[0] else 'validation' if i < cut[1] else 'test'
    for i, b in enumerate(blocks)
  }
  out = {'train': [], 'validation': [], 'test': []}
  for i, pair in enumerate(pairs):
    out[split_of[i // 100]].append(pair)
  return out


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
  import sacrebleu

  return {
    'bleu': sacrebleu.corpus_bleu(predictions, [references]).score,
    'chrf': sacrebleu.corpus_chrf(predictions, [references]).score,
  }
