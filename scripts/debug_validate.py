"""Device debugging aid: each validate_csr failure mode in a fresh subprocess, on CPU and CUDA."""
import subprocess
import sys

CASE = r'''
import faulthandler, sys, torch
faulthandler.enable()
import sparseadapter_ext as ops
dev, kind = sys.argv[1], sys.argv[2]
crow = torch.tensor([0, 2, 3, 5], dtype=torch.int32, device=dev)
col = torch.tensor([0, 3, 1, 2, 3], dtype=torch.int32, device=dev)
if kind == "col": col[0] = 99
if kind == "mono": crow[1] = 4
if kind == "first": crow[0] = 1
if kind == "last": col = col[:-1]
try:
    ops.validate_csr(crow, col, 3, 4)
    print(dev, kind, "no error")
except Exception as e:
    print(dev, kind, type(e).__name__, str(e).splitlines()[0])
'''

if len(sys.argv) == 3:  # one case in this process (e.g. under cuda-gdb)
    exec(CASE)
    sys.exit(0)

for dev in ("cpu", "cuda"):
    for kind in ("ok", "col", "mono", "first", "last"):
        r = subprocess.run([sys.executable, "-c", CASE, dev, kind], capture_output=True, text=True)
        print(f"[{dev} {kind}] rc={r.returncode} {r.stdout.strip()} {r.stderr.strip()[-300:] if r.returncode else ''}")
