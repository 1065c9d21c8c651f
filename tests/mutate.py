"""Plants deliberate bugs, one at a time, in a scratch copy of the repository and reports which the
tests catch (`make mutate`).

  python tests/mutate.py                       # every mutation in tests/mutations.toml
  python tests/mutate.py --only droppath_no_rescale,steptable_no_lock

Each mutation in tests/mutations.toml names a file, one or more exact text replacements (each old
text must occur exactly once, so a mutation that no longer applies is reported, not skipped) and
the tests that should catch it. A mutation is `caught` when those tests fail, `SURVIVED` when they
pass. Exit code 0 when every mutation is caught, 1 when one survives, 2 for a bad list or option.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST = os.path.join(ROOT, 'tests', 'mutations.toml')


class BadList(Exception):
  pass


def load(path: str = LIST) -> list[dict]:
  with open(path, 'rb') as f:
    mutations = tomllib.load(f).get('mutation', [])
  names = set()
  for m in mutations:
    missing = {'name', 'file', 'edits', 'tests'} - set(m)
    if missing:
      raise BadList(f'{path}: mutation {m.get("name", "?")} lacks {sorted(missing)}')
    if m['name'] in names:
      raise BadList(f'{path}: mutation {m["name"]} is listed twice')
    names.add(m['name'])
  return mutations


def _tracked_files() -> list[str]:
  out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True)
  return [p for p in out.stdout.decode().split('\0') if p]


def scratch_copy(destination: str) -> None:
  for path in _tracked_files():
    source = os.path.join(ROOT, path)
    if os.path.isfile(source):
      os.makedirs(os.path.dirname(os.path.join(destination, path)), exist_ok=True)
      shutil.copy2(source, os.path.join(destination, path))


def apply(copy: str, mutation: dict) -> None:
  path = os.path.join(copy, mutation['file'])
  with open(path, encoding='utf-8') as f:
    text = f.read()
  for old, new in mutation['edits']:
    count = text.count(old)
    if count != 1:
      raise BadList(f'mutation {mutation["name"]}: {old!r} occurs {count} times in '
                    f'{mutation["file"]} (must be once)')
    text = text.replace(old, new)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def run_one(mutation: dict, env: dict) -> tuple[str, float]:
  with tempfile.TemporaryDirectory(prefix='modernize-mutant-') as copy:
    scratch_copy(copy)
    apply(copy, mutation)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider',
                          *mutation['tests']], cwd=copy, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
  if res.returncode == 1:
    return 'caught', seconds
  if res.returncode == 0:
    return 'SURVIVED', seconds
  # 2-5: interrupted, internal error, usage error, no tests collected: the list is wrong.
  raise BadList(f'mutation {mutation["name"]}: pytest exit code {res.returncode}\n'
                f'{res.stdout[-1500:]}{res.stderr[-1500:]}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='comma-separated mutation names')
  args = parser.parse_args(argv)
  try:
    mutations = load()
    if args.only:
      wanted = [n for n in args.only.split(',') if n]
      unknown = sorted(set(wanted) - {m['name'] for m in mutations})
      if unknown:
        raise BadList(f'unknown mutation(s) {unknown}; see {LIST}')
      mutations = [m for m in mutations if m['name'] in wanted]
    # One cache for the compiled programs and the native kernel, shared by every mutant's tests
    # (their keys include the program or the source, so a mutant never reads another's entry).
    with tempfile.TemporaryDirectory(prefix='modernize-mutate-cache-') as cache:
      env = {**os.environ, 'MODERNIZE_COMPILATION_CACHE': os.path.join(cache, 'jax'),
             'MODERNIZE_CACHE_DIR': os.path.join(cache, 'native')}
      survived = 0
      print(f'{len(mutations)} mutations from {os.path.relpath(LIST, ROOT)}', flush=True)
      for m in mutations:
        verdict, seconds = run_one(m, env)
        survived += verdict == 'SURVIVED'
        print(f'{verdict:9s} {m["name"]:32s} {seconds:6.0f} s  {m.get("why", "")}', flush=True)
  except BadList as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{len(mutations) - survived} of {len(mutations)} caught', flush=True)
  return 1 if survived else 0


if __name__ == '__main__':
  sys.exit(main())
