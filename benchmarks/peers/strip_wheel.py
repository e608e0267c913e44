"""A wheel repacked without the files that match any of the given patterns, its RECORD rewritten to match: what
keeps a carried wheel small (bitsandbytes without its CUDA 11/12 and ROCm/XPU builds, Unsloth without its web UI).

    python benchmarks/peers/strip_wheel.py WHEEL OUT_FOLDER 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' ...
"""

import fnmatch
import sys
import zipfile
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    wheel, out, patterns = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    target = out / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not any(fnmatch.fnmatch(n, p) for p in patterns)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        kept = set(names)
        for name in names:
            if name == record:
                lines = [line for line in src.read(name).decode().splitlines()
                         if line.split(",", 1)[0] in kept or line.split(",", 1)[0] == record]
                dst.writestr(name, "\n".join(lines) + "\n")
            else:
                dst.writestr(src.getinfo(name), src.read(name))
    print(f"{target}: {len(kept)} files, {target.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
