"""Prototype: scifm's tiny model under DeepSpeed ZeRO on 2 gloo processes vs one native process."""
import json, os, sys, time
import torch, torch.distributed as dist
import deepspeed
from scifm.config import compose_run_config
from scifm.data.loader import PackedLoader
from scifm.data.streams import resolve_sources
from scifm.model.init import init_parameters
from scifm.model.multimodal import ScientificMoE, vocab_sizes_of
from scifm.tokenizers import ScientificTokenizer
from scifm.train.optim import build_optimizer, build_scheduler
from scifm.train.step import scaled_cross_entropy

stage = int(sys.argv[1])
corpus, tokdir = "/tmp/dsdata/corpus", "/tmp/dsdata/tokenizer"
cfg = compose_run_config(["experiment=tiny", f"data.corpus_dir={corpus}", "data.corpus_max_docs_per_source=150",
                          "data.seq_len=64", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.warmup_steps=1",
                          "trainer.lr=1e-3"])
tc = cfg.trainer
tok = ScientificTokenizer.load(tokdir)
specs = resolve_sources(cfg.data)
torch.set_num_threads(1)

def build():
    m = ScientificMoE(cfg.model, vocab_sizes_of(tok)); init_parameters(m, tc.seed, cfg.model.init_std, cfg.model.n_layers)
    return m

def batches(rank, size):
    loader = PackedLoader(cfg.data, specs, tok, cfg.model.encoders, split="train", seed=tc.seed, batch_size=tc.batch_size, dp_rank=rank, dp_size=size)
    return [[loader.next_batch() for _ in range(tc.grad_accum)] for _ in range(3)]

if os.environ.get("RANK") is None:  # reference
    m = build(); opt = build_optimizer(m, tc); sch = build_scheduler(opt, tc)
    out = []
    for micro in batches(0, 1):
        n = sum(b.n_targets for b in micro); tot = 0.0
        for b in micro:
            l = scaled_cross_entropy(m(b.input_ids, **b.model_kwargs()), b.labels, 1.0 / n); l.backward(); tot += float(l)
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), tc.grad_clip)
        opt.step(); sch.step(); opt.zero_grad()
        out.append((tot, float(norm)))
    print("REF", json.dumps(out))
    sys.exit()

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
m = build()
from scifm.parallel.router_stats import apply_global_router_stats
apply_global_router_stats(m, dist.group.WORLD)
opt = build_optimizer(m, tc); sch = build_scheduler(opt, tc)
ds_cfg = {"train_micro_batch_size_per_gpu": tc.batch_size, "gradient_accumulation_steps": tc.grad_accum,
          "gradient_clipping": tc.grad_clip, "zero_optimization": {"stage": stage},
          "managed_gradient_accumulation": False, "steps_per_print": 10**9}
t0 = time.time()
engine, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=sch, config=ds_cfg)
print("init s", time.time() - t0, flush=True)
out = []
for micro in batches(rank, world):
    n = torch.tensor(float(sum(b.n_targets for b in micro))); dist.all_reduce(n)
    tot = torch.zeros((), dtype=torch.float64)
    for b in micro:
        l = scaled_cross_entropy(engine(b.input_ids, **b.model_kwargs()), b.labels, world / float(n))
        engine.backward(l, scale_wrt_gas=False); tot += l.detach().double() / world
    engine.step()
    dist.all_reduce(tot)
    out.append((float(tot), float(engine.get_global_grad_norm())))
if rank == 0:
    print("DS", stage, json.dumps(out))

# ---- save-path probe: which params have an hp mapping on which rank
from deepspeed.utils import safe_get_full_optimizer_state, safe_get_full_fp32_param
info = []
for name, p in engine.module.named_parameters():
    info.append((name, hasattr(p, "_hp_mapping"), getattr(p, "_hp_mapping", "absent") is None, tuple(p.shape), p.requires_grad))
print("RANK", rank, sum(1 for i in info if i[1]), sum(1 for i in info if i[2]), len(info), flush=True)
bad = [i for i in info if not i[1]]
print("RANK", rank, "no mapping:", bad[:10], flush=True)
for name, p in engine.module.named_parameters():
    v = safe_get_full_fp32_param(p)
print("RANK", rank, "fp32 ok", flush=True)
zo = engine.optimizer
for i, g in enumerate(zo.optimizer.param_groups):
    print("RANK", rank, "group", i, [tuple(t.shape) for t in g["params"]], [list(zo.optimizer.state[t].keys()) for t in g["params"]], g.get("lr"), flush=True)
for name, p in engine.module.named_parameters():
    try:
        v = safe_get_full_optimizer_state(p, "exp_avg")
    except ValueError:
        print("RANK", rank, "FAIL", name, p._hp_mapping.lp_fragment_address, flush=True); raise
print("RANK", rank, "exp_avg ok", flush=True)
