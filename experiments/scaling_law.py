"""Scaling law (Hoffmann et al. 2022, Chinchilla): IsoFLOP profiles and a parametric fit.

  python experiments/scaling_law.py --workdir /tmp/scaling_law
  python experiments/scaling_law.py --workdir /tmp/scaling_smoke --smoke
  python experiments/scaling_law.py --workdir /tmp/scaling_large --grid large

For each compute budget C of the grid, decoders of several sizes (a ladder of shapes, the ones
centred on the budget) are each trained for C FLOPs of causal LM on the news corpus (D = C /
FLOPs per token tokens, the FLOPs per token of the model family's `flops_per_token`, attention
included; the smallest models of the larger budgets read the corpus more than once), with a
cosine schedule as long as the run, and scored
by the loss on the whole held-out split. Then
  approach 2  a parabola in log N through each budget's losses gives the budget's best size
              N_opt(C) and token count D_opt(C); N_opt ~ C^a and D_opt ~ C^b by least squares;
  approach 3  L(N, D) = E + A / N^alpha + B / D^beta fitted to every run with the Huber loss
              (delta 1e-3) on log-loss, L-BFGS from a grid of starts, as the paper does; with
              C = 6 N D its compute-optimal frontier has a = beta / (alpha + beta),
              b = alpha / (alpha + beta),
each with 95% bootstrap intervals (runs resampled with replacement). N counts the parameters
every token multiplies (all but the input embedding table, whose lookup costs no FLOPs).
Writes WORKDIR/scaling_law.{md,json}, isoflop.png and frontier.png, the JSON after every run;
rerunning the command resumes a stopped run and reuses the results of finished ones.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Hoffmann et al. 2022: approach 3's fit (Eq. 10), the exponents of N_opt and D_opt ~ C^a, C^b
# (Table 2, approach 2: 0.49, 0.51) and the tokens per parameter of their compute-optimal models.
PAPER = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, a=0.49, b=0.51, tokens_per_param=20)

# The ladder of decoder shapes (layers, d_model), heads of 32, a gated MLP of 8/3 d_model:
# the matmul parameters N grow about 1.7x a rung.
LADDER = (
  (1, 32),
  (2, 32),
  (2, 48),
  (2, 64),
  (3, 80),
  (3, 96),
  (4, 128),
  (5, 160),
  (6, 192),
  (6, 256),
  (8, 320),
  (8, 384),
  (10, 512),
  (12, 640),
  (16, 768),
)


@dataclasses.dataclass(frozen=True)
class Grid:
  budgets: tuple[float, ...]  # Training FLOPs of each IsoFLOP profile.
  sizes: int  # Models per budget: the rungs nearest the budget's centre.
  seq_len: int
  batch: int
  vocab: int  # SentencePiece vocabulary trained on the corpus.
  ladder: tuple[tuple[int, int], ...] = LADDER
  checkpoints: int = 4  # Saves per run (what a stopped sweep resumes from).


GRIDS = {
  'default': Grid((1e12, 3e12, 1e13), 6, 128, 16, 1024),
  # For an accelerator: 5 budgets up to 1e17 (a few GPU-hours) over the larger rungs; the news
  # corpus's few million tokens are then re-read several times, so point data.train at a bigger
  # corpus (dataset=files or prepared) for it.
  'large': Grid((1e15, 3e15, 1e16, 3e16, 1e17), 7, 512, 64, 1024),
  'smoke': Grid((1e9, 2e9), 3, 32, 8, 512, LADDER[:4], checkpoints=1),
}
CENTRE_TOKENS_PER_PARAM = 20  # Where each budget's sizes are centred (the fit decides the optimum).


# Fits
# =============================================================================================
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber loss of residuals r and its derivative."""
  small = np.abs(r) <= delta
  loss = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
  return loss, np.where(small, r, delta * np.sign(r))


def _objective(theta, log_n, log_d, log_l, delta):
  """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) and its gradient, with
  theta = (a, b, e, alpha, beta): A = exp(a), B = exp(b), E = exp(e)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top = terms.max(0)
  weights = np.exp(terms - top)
  total = weights.sum(0)
  loss, slope = _huber(top + np.log(total) - log_l, delta)
  w = slope * weights / total  # d loss / d term, per run.
  grad = np.array(
    [w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * log_n).sum(), -(w[1] * log_d).sum()]
  )
  return loss.sum(), grad


def fit_parametric(
  n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = 1e-3, starts=None, refine=16
) -> dict[str, float]:
  """Approach 3: E, A, B, alpha, beta of L = E + A / N^alpha + B / D^beta minimising the Huber
  loss of log-loss residuals: L-BFGS from the `refine` best points of the paper's grid of
  starting points (or from `starts`, theta vectors), the best result kept."""
  from scipy import optimize
  from threadpoolctl import threadpool_limits

  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
  if starts is None:
    grid = np.meshgrid(
      [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],  # a = log A
      [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],  # b = log B
      [-1.0, -0.5, 0.0, 0.5, 1.0],  # e = log E
      [0.0, 0.5, 1.0, 1.5, 2.0],  # alpha
      [0.0, 0.5, 1.0, 1.5, 2.0],  # beta
      indexing='ij',
    )
    grid = np.stack([g.ravel() for g in grid], axis=1)
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))  # Every start at once.
    terms = np.stack([a - alpha * log_n, b - beta * log_d, e + 0 * log_n])
    scores = _huber(np.logaddexp.reduce(terms, axis=0) - log_l, delta)[0].sum(1)
    starts = grid[np.argsort(scores)[:refine]]
  best = None
  with threadpool_limits(1):  # Five parameters: BLAS threads only spin (10x slower on 2 cores).
    for theta0 in starts:
      result = optimize.minimize(
        _objective, theta0, args=(log_n, log_d, log_l, delta), jac=True, method='L-BFGS-B'
      )
      if best is None or result.fun < best.fun:
        best = result
  a, b, e, alpha, beta = (float(v) for v in best.x)
  return dict(
    E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, objective=float(best.fun)
  )


def frontier(fit: dict[str, float], budgets) -> dict[str, list[float] | float]:
  """The compute-optimal N and D of a parametric fit at each budget, with C = 6 N D:
  N_opt = G (C/6)^a, D_opt = (C/6)^b / G, G = (alpha A / (beta B))^(1 / (alpha + beta))."""
  alpha, beta = fit['alpha'], fit['beta']
  a, b = beta / (alpha + beta), alpha / (alpha + beta)
  g = (alpha * fit['A'] / (beta * fit['B'])) ** (1 / (alpha + beta))
  n = [g * (c / 6) ** a for c in budgets]
  d = [(c / 6) ** b / g for c in budgets]
  return dict(a=a, b=b, n_opt=n, d_opt=d, tokens_per_param=[y / x for x, y in zip(n, d)])


def fit_isoflop(runs: list[dict]) -> dict:
  """Approach 2: per budget, the vertex of a parabola in log N (and in log D) through the
  losses; then log N_opt and log D_opt linear in log C. Budgets whose parabola has no minimum
  within their sizes (it opens downwards, or its vertex lies beyond them) are left out and
  listed."""
  budgets = sorted({r['budget'] for r in runs})
  kept, n_opt, d_opt, skipped = [], [], [], []
  for c in budgets:
    rows = [r for r in runs if r['budget'] == c]
    loss = np.array([r['loss'] for r in rows])
    vertices = []
    for key in ('n', 'd'):
      x = np.log([r[key] for r in rows])
      if len(set(x)) < 3:  # A parabola needs three sizes (a resampling may repeat one).
        break
      k2, k1, _ = np.polyfit(x, loss, 2)
      vertex = -k1 / (2 * k2) if k2 > 0 else math.inf
      if not x.min() <= vertex <= x.max():  # No minimum among the sizes: not interpolated.
        break
      vertices.append(math.exp(vertex))
    if len(vertices) < 2:
      skipped.append(c)
      continue
    kept.append(c)
    n_opt.append(vertices[0])
    d_opt.append(vertices[1])
  out = dict(budgets=kept, n_opt=n_opt, d_opt=d_opt, skipped=skipped)
  if len(kept) >= 2:
    out['a'] = float(np.polyfit(np.log(kept), np.log(n_opt), 1)[0])
    out['b'] = float(np.polyfit(np.log(kept), np.log(d_opt), 1)[0])
  return out


def bootstrap(runs: list[dict], samples: int, seed: int, start) -> dict[str, tuple[float, float]]:
  """95% intervals of both approaches' estimates over `samples` resamplings of the runs (with
  replacement; approach 2 resamples within each budget); approach 3 refits from `start` (the
  full data's optimum) and a few nearby points."""
  rng = np.random.default_rng(seed)
  start = np.asarray(start)
  starts = [start] + [start + rng.normal(0, 0.5, 5) * [2, 2, 0.3, 0.1, 0.1] for _ in range(3)]
  values: dict[str, list[float]] = {}
  budgets = sorted({r['budget'] for r in runs})
  for _ in range(samples):
    pick = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
    fit = fit_parametric(*_arrays(pick), starts=starts)
    f = frontier(fit, budgets)
    for k in ('E', 'alpha', 'beta'):
      values.setdefault(k, []).append(fit[k])
    for k in ('a', 'b'):
      values.setdefault(f'parametric_{k}', []).append(f[k])
    values.setdefault('tokens_per_param', []).append(f['tokens_per_param'][-1])
    within = []
    for c in budgets:
      rows = [r for r in runs if r['budget'] == c]
      within += [rows[i] for i in rng.integers(0, len(rows), len(rows))]
    iso = fit_isoflop(within)
    if 'a' in iso:
      values.setdefault('isoflop_a', []).append(iso['a'])
      values.setdefault('isoflop_b', []).append(iso['b'])
  return {
    k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in values.items()
  }


def _arrays(runs: list[dict]):
  return tuple(np.array([r[k] for r in runs], dtype=float) for k in ('n', 'd', 'loss'))


def theta(fit: dict[str, float]) -> list[float]:
  return [math.log(fit['A']), math.log(fit['B']), math.log(fit['E']), fit['alpha'], fit['beta']]


# The sweep
# =============================================================================================
def base_config(grid: Grid):
  """experiments/lm_news.py with the grid's sequence, batch and vocabulary; evaluation only at
  the end, on the whole held-out split."""
  from fm import configs

  c = configs.load('experiments/lm_news.py', 'scaling_law')
  c.data.update(seq_len=grid.seq_len)
  c.data.tokenizer.vocab_size = grid.vocab
  c.train.update(global_batch=grid.batch, eval_batches=1, final_eval_batches=-1)
  c.checkpoint.keep = 1
  return c


def shape(rung: tuple[int, int], grid: Grid):
  """The decoder Config of a ladder rung, with the grid's vocabulary."""
  from fm import train

  layers, d_model = rung
  c = base_config(grid)
  c.model.update(
    variant='tiny',
    num_layers=layers,
    d_model=d_model,
    num_heads=d_model // 32,
    num_kv_heads=d_model // 32,
    head_dim=32,
    mlp_dim=-(-8 * d_model // 3 // 16) * 16,
    max_len=grid.seq_len,
  )
  return c, train.model_config(c, grid.vocab)[1]


def plan(grid: Grid) -> list[dict]:
  """Every run of the grid with its own config: per budget, the `sizes` rungs whose N is nearest
  (in log) to the budget's centre, N with C = 6 N (20 N); steps so that steps x batch x seq_len
  x FLOPs per token is the budget (D and C as trained, after rounding)."""
  from fm import registry

  family = registry.get('models', 'decoder')
  rungs = []
  for rung in grid.ladder:
    model_cfg = shape(rung, grid)[1]
    n = family.flops_per_token(model_cfg, 0) / 6  # Matmul params: 6 FLOPs each per token.
    rungs.append((rung, n, family.flops_per_token(model_cfg, grid.seq_len)))
  runs = []
  tokens_per_step = grid.batch * grid.seq_len
  for budget in grid.budgets:
    centre = math.sqrt(budget / (6 * CENTRE_TOKENS_PER_PARAM))
    near = sorted(rungs, key=lambda r: abs(math.log(r[1] / centre)))[: grid.sizes]
    for rung, n, flops in sorted(near, key=lambda r: r[1]):
      steps = max(round(budget / (flops * tokens_per_step)), 1)
      config = shape(rung, grid)[0]
      config.train.update(steps=steps, eval_every=steps, log_every=max(steps // 20, 1))
      config.optim.warmup_steps = max(min(steps // 10, 100), 1)
      config.checkpoint.every_steps = max(steps // grid.checkpoints, 1)
      runs.append(
        dict(
          budget=budget,
          layers=rung[0],
          d_model=rung[1],
          n=n,
          flops_per_token=flops,
          steps=steps,
          d=steps * tokens_per_step,
          flops=steps * tokens_per_step * flops,
          config=config,
        )
      )
  return runs


def train_all(workdir: pathlib.Path, grid: Grid) -> list[dict] | None:
  """Trains every run of the grid not finished in an earlier command (those keep their recorded
  results), the JSON rewritten after each; None when preempted. A run's `seconds` are its
  training time summed over the commands that trained it."""
  import time

  from fm import checkpoint
  from fm import metrics as metrics_lib
  from fm import runs as fm_runs

  path = workdir / 'scaling_law.json'
  before = json.loads(path.read_text()) if path.exists() else {}
  finished = {r['name']: r for r in before.get('runs', [])}
  spent = before.get('spent', {})  # Seconds of runs not finished yet.
  done = []
  for run in plan(grid):
    config, steps = run.pop('config'), run['steps']
    name = f'C{run["budget"]:.0e}-L{run["layers"]}-D{run["d_model"]}'
    record = finished.get(name)
    if record and record['steps'] == steps and checkpoint.latest_step(workdir / name) >= steps:
      print(f'{name}: finished earlier, held-out loss {record["loss"]:.4f} (as recorded)')
      done.append(record)
      continue
    start = time.time()
    metrics = fm_runs.run(config, workdir / name)
    elapsed = time.time() - start
    if 'loss' not in metrics:  # Preempted: the run resumes from its checkpoint next time.
      spent[name] = spent.get(name, 0.0) + elapsed
      metrics_lib.write_json(path, {'runs': done, 'spent': spent})
      return None
    seconds = spent.pop(name, 0.0) + elapsed
    run.update(
      name=name,
      loss=metrics['loss'],
      seconds=seconds,
      curve=metrics_lib.series(workdir / name, 'train/loss'),
    )
    done.append(run)
    metrics_lib.write_json(path, {'runs': done, 'spent': spent})
  return done


# Report
# =============================================================================================
def analyse(runs: list[dict], samples: int) -> dict:
  budgets = sorted({r['budget'] for r in runs})
  fit = fit_parametric(*_arrays(runs))
  return dict(
    parametric=fit,
    frontier=frontier(fit, budgets),
    isoflop=fit_isoflop(runs),
    intervals=bootstrap(runs, samples, seed=0, start=theta(fit)),
    budgets=budgets,
  )


def _count(x: float) -> str:
  """1234567 -> '1.23M', 45600 -> '45.6k'."""
  return f'{x / 1e6:.2f}M' if x >= 1e6 else f'{x / 1e3:.1f}k'


def report(runs: list[dict], result: dict) -> str:
  fit, front, iso, ci = (
    result['parametric'],
    result['frontier'],
    result['isoflop'],
    result['intervals'],
  )

  def est(value, key):
    lo_hi = ci.get(key)
    return f'{value:.2f} [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]' if lo_hi else f'{value:.2f}'

  lines = ['Runs (loss: held-out cross-entropy, nats per token)', '']
  lines += ['| budget C | layers x d_model | N | D | D / N | steps | loss | minutes |']
  lines += ['|---|---|---|---|---|---|---|---|']
  for r in runs:
    lines.append(
      f'| {r["budget"]:.0e} | {r["layers"]} x {r["d_model"]} | {_count(r["n"])} '
      f'| {_count(r["d"])} | {r["d"] / r["n"]:.1f} | {r["steps"]} | {r["loss"]:.4f} '
      f'| {r["seconds"] / 60:.1f} |'
    )
  lines += ['', 'Fits (95% bootstrap intervals) beside Hoffmann et al. 2022', '']
  lines += ['| quantity | fm | paper |', '|---|---|---|']
  lines.append(f'| alpha (L ~ A / N^alpha) | {est(fit["alpha"], "alpha")} | {PAPER["alpha"]} |')
  lines.append(f'| beta (L ~ B / D^beta) | {est(fit["beta"], "beta")} | {PAPER["beta"]} |')
  lines.append(f'| E (irreducible loss) | {est(fit["E"], "E")} | {PAPER["E"]} |')
  lines.append(f'| a (N_opt ~ C^a), approach 3 | {est(front["a"], "parametric_a")} | 0.46 |')
  lines.append(f'| b (D_opt ~ C^b), approach 3 | {est(front["b"], "parametric_b")} | 0.54 |')
  if 'a' in iso:
    lines.append(f'| a, approach 2 (IsoFLOP) | {est(iso["a"], "isoflop_a")} | {PAPER["a"]} |')
    lines.append(f'| b, approach 2 (IsoFLOP) | {est(iso["b"], "isoflop_b")} | {PAPER["b"]} |')
  tpp = front['tokens_per_param'][-1]
  lines.append(
    f'| tokens per parameter at C = {result["budgets"][-1]:.0e} '
    f'| {est(tpp, "tokens_per_param")} | {PAPER["tokens_per_param"]} |'
  )
  lines += [
    '',
    'Compute-optimal models',
    '',
    '| C | N_opt (3) | D_opt (3) | N_opt (2) | D_opt (2) | paper N_opt | paper D_opt |',
  ]
  lines += ['|---|---|---|---|---|---|---|']
  paper = frontier(PAPER, result['budgets'])  # Its Eq. 10, far below the budgets it fitted.
  for i, c in enumerate(result['budgets']):
    two = ['', '']
    if c in iso['budgets']:
      j = iso['budgets'].index(c)
      two = [_count(iso['n_opt'][j]), _count(iso['d_opt'][j])]
    lines.append(
      f'| {c:.0e} | {_count(front["n_opt"][i])} | {_count(front["d_opt"][i])} '
      f'| {two[0]} | {two[1]} | {_count(paper["n_opt"][i])} | {_count(paper["d_opt"][i])} |'
    )
  if iso['skipped']:
    lines.append('')
    lines.append(
      'Budgets without an interior minimum (approach 2 leaves them out): '
      + ', '.join(f'{c:.0e}' for c in iso['skipped'])
    )
  return '\n'.join(lines)


def plot(runs: list[dict], result: dict, workdir: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fit, front = result['parametric'], result['frontier']
  # FLOPs per token against N along the ladder (attention included), a power law in log-log.
  slope, offset = np.polyfit(
    np.log([r['n'] for r in runs]), np.log([r['flops_per_token'] for r in runs]), 1
  )
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for c in result['budgets']:
    rows = sorted((r for r in runs if r['budget'] == c), key=lambda r: r['n'])
    n = np.array([r['n'] for r in rows])
    (line,) = ax.plot(n, [r['loss'] for r in rows], 'o', label=f'C = {c:.0e}')
    grid_n = np.geomspace(n.min() / 1.5, n.max() * 1.5, 50)
    grid_d = c / np.exp(offset + slope * np.log(grid_n))
    modelled = fit['E'] + fit['A'] / grid_n ** fit['alpha'] + fit['B'] / grid_d ** fit['beta']
    ax.plot(grid_n, modelled, '-', color=line.get_color(), alpha=0.6)
  ax.set(xscale='log', xlabel='parameters N (matmul)', ylabel='held-out loss (nats/token)')
  ax.set_title('IsoFLOP profiles; lines: fitted L(N, D = C / FLOPs per token)', fontsize=10)
  _save(fig, ax, workdir / 'isoflop.png')

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  budgets = np.array(result['budgets'])
  span = np.geomspace(budgets.min() / 3, budgets.max() * 30, 50)
  ax.plot(span, frontier(fit, span)['n_opt'], '-', label=f'approach 3: N ~ C^{front["a"]:.2f}')
  iso = result['isoflop']
  if iso['budgets']:
    ax.plot(iso['budgets'], iso['n_opt'], 's', label='approach 2: IsoFLOP minima')
  paper = frontier(PAPER, span)['n_opt']
  ax.plot(span, paper, '--', color='gray', label='Hoffmann et al. fit')
  ax.set(xscale='log', yscale='log', xlabel='training FLOPs C', ylabel='compute-optimal N')
  _save(fig, ax, workdir / 'frontier.png')


def _save(fig, ax, path: pathlib.Path) -> None:
  import matplotlib.pyplot as plt

  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--grid', default='default', choices=sorted(GRIDS))
  parser.add_argument('--smoke', action='store_true', help="the 'smoke' grid: 6 runs, seconds each")
  parser.add_argument('--bootstrap', type=int, default=200, help='resamplings for the intervals')
  args = parser.parse_args()
  grid = GRIDS['smoke' if args.smoke else args.grid]
  workdir = pathlib.Path(args.workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  from fm import ConfigError, metrics

  try:
    runs = train_all(workdir, grid)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except FloatingPointError as e:  # A run diverged: its recipe in this file needs a change.
    print(f'error: {e}', file=sys.stderr)
    return 1
  if runs is None:
    print('stopped (preempted); rerun the same command to resume.')
    return 0
  result = analyse(runs, 20 if args.smoke else args.bootstrap)
  markdown = report(runs, result)
  metrics.write_json(workdir / 'scaling_law.json', {'runs': runs, **result})
  (workdir / 'scaling_law.md').write_text(markdown + '\n')
  plot(runs, result, workdir)
  print(markdown)
  return 0


if __name__ == '__main__':
  sys.exit(main())
