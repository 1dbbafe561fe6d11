#!/usr/bin/env python3
"""The house's shape from its imports: circles between files (Tarjan over every file's
use/crate::/super:: paths, tests included, comments not), files importing their own
parent module, top-level modules importing each other, files over 600 code lines, and
files without a //! header. Usage: python3 .ci/house.py src [-v] [--no-tests]"""
import os, re, sys, collections
root = sys.argv[1] if len(sys.argv) > 1 else 'src'
files = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith('.rs'):
            p = os.path.join(d, f)
            files[p] = open(p).read()
def modpath(p):
    rel = os.path.relpath(p, root)[:-3].split('/')
    if rel[-1] in ('mod', 'lib', 'main'): rel = rel[:-1]
    return rel
NOTEST = '--no-tests' in sys.argv
mods = {tuple(modpath(p)): p for p in files}
edges = collections.defaultdict(set)
def parse_uses(s):
    out = []
    for m in re.finditer(r'\b(?:pub(?:\([\w ]+\))?\s+)?use\s+([\w:{}, \n*]+?);', s, re.S):
        out.append(m.group(1))
    return out
def expand(prefix, b):
    b = b.strip()
    if b.startswith('{'):
        pre, inner = '', b[1:-1]
    else:
        m = re.match(r'^([\w:]*?)::\{(.*)\}$', b, re.S)
        if not m:
            return [prefix + b.split('::')]
        pre, inner = m.group(1), m.group(2)
    parts = []; depth = 0; cur = ''
    for ch in inner:
        if ch == '{': depth += 1
        if ch == '}': depth -= 1
        if ch == ',' and depth == 0: parts.append(cur); cur = ''
        else: cur += ch
    parts.append(cur)
    res = []
    for o in parts:
        o = o.strip()
        if o: res += expand(prefix + (pre.split('::') if pre else []), o)
    return res
def resolve(me, path, in_tests):
    # me: module path of the file; inside `mod tests`, super = the file itself
    here = list(me) + (['tests'] if in_tests else [])
    out = []
    cur = None
    for i, seg in enumerate(path):
        if i == 0 and seg == 'crate': cur = []; continue
        if seg == 'super':
            cur = (here if cur is None else cur)[:-1]; continue
        if seg == 'self':
            cur = here if cur is None else cur; continue
        if cur is None:
            # relative path: a child module of this file, else an external crate
            if tuple(here + [seg]) in mods: cur = list(here)
            else: return None
        cur = cur + [seg]
    return cur
test_edges = set()
for p, s in files.items():
    me = tuple(modpath(p))
    s = re.sub(r'//[^\n]*', '', s)
    code, _, tests = s.partition('#[cfg(test)]')
    # a `use super::` indented inside an inline module names this file's items
    code = re.sub(r'(?m)^([ \t]+)use super::', r'\1use self::', code)
    for part, in_tests in ((code, False), (tests, True)):
        if in_tests and NOTEST: continue
        paths = []
        for body in parse_uses(part):
            for path in expand([], body):
                paths.append(path)
        for m in re.finditer(r'\b((?:crate|super)(?:::\w+)+)', part):
            paths.append(m.group(1).split('::'))
        for path in paths:
            full = resolve(me, path, in_tests)
            if not full: continue
            for k in range(len(full), 0, -1):
                t = tuple(full[:k])
                if t in mods:
                    if t != me:
                        edges[me].add(t)
                        if in_tests: test_edges.add((me, t))
                    break
# file-level cycles (exclude parent->child edges of mod declarations, which are not use)
def sccs():
    idx = {}; low = {}; st = []; on = set(); out = []; c = [0]
    sys.setrecursionlimit(10000)
    def dfs(v):
        idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
        for w in edges.get(v, ()):
            if w not in idx: dfs(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(comp)
    for v in list(mods):
        if v not in idx: dfs(v)
    return out
print('== circles between files')
for comp in sccs():
    print('  ', sorted('::'.join(x) or 'crate' for x in comp))
print('== a file importing its own parent module (a folder importing the one above it)')
for a_, bs in edges.items():
    for b_ in bs:
        if len(a_) > 1 and len(b_) < len(a_) and a_[:len(b_)] == b_ and not (len(a_) > 1 and a_[-1] == 'tests'):
            print('  ', '::'.join(a_), '->', '::'.join(b_) or 'crate')
print('== top-level modules importing each other')
top = collections.defaultdict(set)
for a, bs in edges.items():
    for b in bs:
        if a[0] != b[0]: top[a[0]].add(b[0])
for a in sorted(top):
    for b in top[a]:
        if a in top.get(b, ()) and a < b: print('  ', a, '<->', b)
print('== files over 600 code lines (before #[cfg(test)])')
for p, s in sorted(files.items()):
    code = s.split('#[cfg(test)]')[0].count('\n')
    if code > 600: print('  ', p, code)
print('== files without //! header')
for p, s in sorted(files.items()):
    if not s.lstrip().startswith('//!'): print('  ', p)
if '-v' in sys.argv:
    for comp in sccs():
        cs = set(comp)
        print('-- edges in', sorted('::'.join(x) for x in comp)[:3], '...')
        for a in comp:
            for b in edges[a]:
                if b in cs: print('    ', '::'.join(a) or 'crate', '->', '::'.join(b))
