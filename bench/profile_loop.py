"""cProfile of the engine's loop on the tutorial job: where its own Python time goes, per step.

    python bench/profile_loop.py [TOP]

Prints the total per step under the profiler, the TOP functions by own time, then the own time of
every function of engine/ and plugins/ (what the engine adds over torch). Not a benchmark: the
profiler inflates every call; compare its rows with each other and across commits.
"""

import cProfile
import pstats
import sys
import tempfile

import torch

import engine

torch.set_num_threads(1)
EPOCHS = 3000
runs = tempfile.mkdtemp()
t = engine.setup(
    {"seed": 42, "runs_dir": runs}, overrides=["device=cpu", f"epochs={EPOCHS}", "log.every=100"], blocked=["console"]
)
t.start()
t.loop()
t.state.epoch, t.state.batch, t.state.step, t.state.stop = 1, 0, 0, False  # warm
profile = cProfile.Profile()
profile.enable()
t.loop()
profile.disable()
stats = pstats.Stats(profile)
rows = []
for (file, _, name), (_, calls, own, *_) in stats.stats.items():
    rows.append((own / EPOCHS * 1e6, calls / EPOCHS, f"{file.split('/')[-1]}:{name}" if file != "~" else name))
rows.sort(reverse=True)
total = sum(r[0] for r in rows)
print(f"total {total:.1f} us/step (under cProfile)")
for us, calls, name in rows[: int(sys.argv[1]) if len(sys.argv) > 1 else 18]:
    print(f"{us:7.2f} us  {calls:5.2f} calls/step  {name}")
ours = {}
for (file, _, name), (_, _, own, *_) in stats.stats.items():
    if "/engine/" in file or "/plugins/" in file:
        key = f"{file.split('/')[-2]}/{file.split('/')[-1]}:{name}"
        ours[key] = ours.get(key, 0) + own / EPOCHS * 1e6
print(f"engine and plugins, own time: {sum(ours.values()):.2f} us/step")
for key, us in sorted(ours.items(), key=lambda kv: -kv[1]):
    if us >= 0.05:
        print(f"   {us:6.2f} us  {key}")
