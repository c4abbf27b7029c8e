"""Evaluation suite of a training workdir.

    python -m dream_jax.evaluate --workdir=workdirs/tiny \
        --evals=retrieval,zero_shot,few_shot,linear_probe,fid,clip_score,compositional \
        --inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth

    # every checkpoint of the workdir, plots of the metrics over steps:
    python -m dream_jax.evaluate --workdir=workdirs/tiny --steps=all --evals=retrieval,few_shot

    # the probe-vs-raw-pixels report on the synthetic attributes:
    python -m dream_jax.evaluate --workdir=workdirs/tiny --evals=few_shot,linear_probe \
        --baselines=pixels,random_init

Evaluations (all with the EMA weights unless --nouse_ema):
  retrieval      image↔text recall@1/5 on held-out (image, caption) pairs
  zero_shot      attribute classification from prompt templates (colour, shape, size,
                 background), overall and on held-out (colour, shape) combinations
  few_shot       closed-form ridge probe, 1/5/10/25 shots × seeds, frozen features
  linear_probe   MAE protocol: mean of the buffer tokens of the encoder on the unmasked
                 image, BatchNorm (no affine) + linear, LARS, cosine schedule
  fid            FID (InceptionV3 FID weights, TF1 resize) of generated images per decoding
                 mode (plain, sad) against the real held-out images of the same prompts
  clip_score     100 × max(cos, 0) with the model's own contrastive branch, for generated and
                 real images (an external OpenCLIP checkpoint is not supported: clear error)
  compositional  attribute-reader match rates (colour, shape, colour+shape) of generated
                 images for held-out prompts, split into held-out / seen combinations

Probe data: the synthetic world's attributes (train split for fitting, held-out split for
testing) or, with --probe_tfds=imagenet2012, a prepared array_record TFDS dataset.
Baselines (--baselines): ``pixels`` (the same probes on downsampled raw pixels) and
``random_init`` (the same architecture at initialisation).

Writes eval/step_XXXXXXXX.json per checkpoint, eval/results.json, eval/results.md and, with
several checkpoints, eval/plots/<group>.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Dict, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from dream_jax.data import pipeline, synthetic
from dream_jax.evals import datasets, fid as fid_lib, inception, probes, report, suite

ALL_EVALS = ("retrieval", "zero_shot", "few_shot", "linear_probe", "fid", "clip_score", "compositional")
GENERATIVE_EVALS = ("fid", "clip_score", "compositional")
BASELINES = ("pixels", "random_init")
DEFAULT_INCEPTION_PATHS = (
    os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub", "checkpoints",
                 inception.TORCH_FIDELITY_WEIGHTS),
)


@dataclasses.dataclass
class EvalOptions:
    evals: Sequence[str] = ALL_EVALS
    use_ema: bool = True
    batch_size: int = 128                 # images per compiled encoder call (sharded over the mesh)
    # retrieval / zero-shot
    num_examples: int = 1024
    # probes
    feature: str = "buffer"               # buffer | mean | embed
    probe_tasks: Sequence[str] = datasets.DEFAULT_SYNTHETIC_TASKS
    probe_train: int = 4096
    probe_test: int = 1024
    shots: Sequence[int] = (1, 5, 10, 25)
    seeds: Sequence[int] = (0, 1, 2)
    l2_reg: Optional[float] = None        # few-shot ridge regulariser; None: leave-one-out per support set
    probe_epochs: int = 90
    probe_batch: int = 512
    # lr = base_lr × batch / 256: 3.2 × 512/256 = 6.4, MAE's absolute LARS rate (0.1 × 16384/256)
    probe_base_lr: float = 3.2
    probe_warmup_epochs: int = 10
    probe_optimizer: str = "lars"
    probe_tfds: Optional[str] = None      # e.g. 'imagenet2012' (array_record, prepared offline)
    probe_data_dir: Optional[str] = None
    baselines: Sequence[str] = ("pixels",)
    # generation (fid, clip_score, compositional)
    num_generate: int = 256
    sample_modes: Sequence[str] = ("plain", "sad")
    cfg: float = 3.0
    cfg_schedule: str = "linear"
    num_iter: int = 64
    diffusion_steps: str = "100"
    sad_candidates: int = 5
    sad_step: Optional[float] = None
    temperature: float = 1.0
    gen_batch: int = 64
    gen_seed: int = 0
    # fid
    inception_weights: Optional[str] = None   # .pth / .npz; 'random[:seed]' = random weights (smoke tests)
    fid_reference: Optional[str] = None        # folder of real images; default: held-out images
    inception_batch: int = 64
    inception_size: int = 299               # FID is defined at 299; smaller only for smoke tests
    # clip score
    openclip_checkpoint: Optional[str] = None


def _parse_l2_reg(text: str) -> Optional[float]:
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"l2_reg={text!r} must be a positive number or 'auto'")
    return value


def _validate(opts: EvalOptions):
    unknown = sorted(set(opts.evals) - set(ALL_EVALS))
    if unknown:
        raise ValueError(f"unknown eval(s) {unknown}; choose from {ALL_EVALS}")
    unknown = sorted(set(opts.baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {BASELINES}")
    if opts.l2_reg is not None and not opts.l2_reg > 0:
        raise ValueError(f"l2_reg={opts.l2_reg!r} must be > 0 (or None: leave-one-out)")
    if opts.feature not in suite.FEATURE_KINDS:
        raise ValueError(f"feature={opts.feature!r} must be one of {suite.FEATURE_KINDS}")
    if "clip_score" in opts.evals and opts.openclip_checkpoint:
        suite.eval_clip_score(None, {}, [], opts.openclip_checkpoint)     # raises the clear error
    if "fid" in opts.evals:
        resolve_inception_weights(opts.inception_weights)


def resolve_inception_weights(spec: Optional[str]) -> str:
    if spec and spec.startswith("random"):
        return spec
    candidates = [spec] if spec else [os.environ.get("DREAM_JAX_INCEPTION", "")] + list(DEFAULT_INCEPTION_PATHS)
    for path in candidates:
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"FID needs the InceptionV3 FID weights ({inception.TORCH_FIDELITY_WEIGHTS}, from torch-fidelity's "
        f"v0.2.0 release) on local disk: pass --inception_weights=PATH or set DREAM_JAX_INCEPTION "
        f"(looked at: {[c for c in candidates if c] or 'nothing given'}); "
        f"--inception_weights=random gives a smoke-test FID that is not comparable to anything")


def _inception_extractor(spec: str, batch_size: int, input_size: int = inception.INPUT_SIZE):
    if spec.startswith("random"):
        seed = int(spec.split(":")[1]) if ":" in spec else 0
        return inception.InceptionExtractor(inception.init_variables(seed), batch_size=batch_size,
                                            input_size=input_size)
    return inception.InceptionExtractor.from_file(spec, batch_size=batch_size, input_size=input_size)


def _read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} has no config.json: not a dream_jax training workdir")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _random_init_variables(model, seed: int = 0):
    from dream_jax import train
    from dream_jax.models.dream import DreamModel, dummy_inputs

    init = jax.jit(lambda: model.init({"params": jax.random.PRNGKey(seed)},
                                      *dummy_inputs(model.arch, 2), method=DreamModel.init_all))
    variables = train.strip_boxes(init())
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


class WorkdirEvaluator:
    """Holds the data, the compiled encoders and the generator across checkpoints of one workdir.

    ``generate_fns``: optional {mode: prompts -> uint8 images} replacing the workdir's own
    generator (e.g. to score real images or an external model)."""

    def __init__(self, workdir: str, opts: EvalOptions, log: Callable[[str], None] = print,
                 generate_fns: Optional[Mapping[str, Callable]] = None):
        _validate(opts)
        self.workdir, self.opts, self.log = os.path.abspath(workdir), opts, log
        self.cfg = _read_config(self.workdir)
        self.generate_fns = dict(generate_fns) if generate_fns is not None else None
        self.generator = None
        self.enc = None
        self._cache = {}

    # ---- loading ------------------------------------------------------------------------
    def available_steps(self):
        from dream_jax import checkpoint as ckpt_lib

        ck = ckpt_lib.Checkpointer(self.workdir, async_save=False)
        try:
            return sorted(int(s) for s in ck.manager.all_steps())
        finally:
            ck.close()

    def load(self, step: Optional[int] = None):
        """Restores a checkpoint; compiled functions are reused across checkpoints."""
        from dream_jax.sampling.api import Generator

        gen = Generator.from_workdir(self.workdir, step=step, use_ema=self.opts.use_ema)
        if self.generator is None:
            self.generator = gen
            self.enc = suite.ModelEncoders(gen.model, gen.variables, gen.image_tokenizer,
                                           gen.text_tokenizer, self.cfg.data.clip_context, gen.mesh,
                                           self.opts.batch_size)
        else:
            self.generator.variables = gen.variables
            self.generator.info = gen.info
            self.enc = self.enc.with_variables(gen.variables)
        return gen.info["step"]

    # ---- data (built once) --------------------------------------------------------------
    def _heldout(self, n):
        key = ("heldout", n)
        if key not in self._cache:
            data = pipeline.heldout_examples(self.cfg, self.generator.text_tokenizer, n)
            if "image" not in data:
                raise ValueError(f"data.source={self.cfg.data.source!r} gives no held-out images (only "
                                 f"cached latents); the evaluations need images: evaluate with a config "
                                 f"whose held-out data are images (synthetic or arrayrecord)")
            self._cache[key] = data
        return self._cache[key]

    def _labelled(self, name: str, n: int):
        """Held-out data with the synthetic world's labels, or None (logged) without them."""
        data = self._heldout(n)
        if "labels" not in data:
            self.log(f"  {name} skipped: it needs the synthetic world's attribute labels "
                     f"(data.source={self.cfg.data.source!r})")
            return None
        return data

    def _probe_sets(self):
        if "probe" not in self._cache:
            o, c = self.opts, self.cfg
            if o.probe_tfds:
                self._cache["probe"] = datasets.tfds_probe_sets(o.probe_tfds, c.data.image_size, o.probe_train,
                                                                o.probe_test, o.probe_data_dir)
            else:
                if c.data.source != "synthetic":
                    raise ValueError("probes on a non-synthetic source need --probe_tfds")
                self._cache["probe"] = (
                    datasets.synthetic_probe_set(c.data.image_size, "train", o.probe_train, c.data.world_seed,
                                                 o.probe_tasks),
                    datasets.synthetic_probe_set(c.data.image_size, "heldout", o.probe_test, c.data.world_seed,
                                                 o.probe_tasks))
        return self._cache["probe"]

    def _feature_sets(self):
        """{name: (train_feats, test_feats)} for the model and each baseline."""
        train, test = self._probe_sets()
        out = {"": (self.enc.features(train["images"], self.opts.feature),
                    self.enc.features(test["images"], self.opts.feature))}
        if "pixels" in self.opts.baselines:
            if "pixels" not in self._cache:
                self._cache["pixels"] = (datasets.pixel_features(train["images"]),
                                         datasets.pixel_features(test["images"]))
            out["/pixels"] = self._cache["pixels"]
        if "random_init" in self.opts.baselines:
            if "random_init" not in self._cache:
                rnd = self.enc.with_variables(_random_init_variables(self.generator.model))
                self._cache["random_init"] = (rnd.features(train["images"], self.opts.feature),
                                              rnd.features(test["images"], self.opts.feature))
            out["/random_init"] = self._cache["random_init"]
        return out

    def _generated(self) -> Dict[str, np.ndarray]:
        """{mode: uint8 images} for the first num_generate held-out prompts (per checkpoint)."""
        if "generated" in self._cache:
            return self._cache["generated"]
        o = self.opts
        data = self._heldout(o.num_generate)
        fns = self.generate_fns
        if fns is None:
            sad_step = o.sad_step
            if sad_step is not None and float(sad_step).is_integer() and sad_step >= 1:
                sad_step = int(sad_step)
            settings = dict(cfg=o.cfg, cfg_schedule=o.cfg_schedule, num_iter=o.num_iter,
                            diffusion_steps=o.diffusion_steps,
                            temperature=o.temperature, sad_candidates=o.sad_candidates,
                            sad_step=sad_step, seed=o.gen_seed, batch_size=o.gen_batch)
            fns = {m: suite.generator_fn(self.generator, m, **settings) for m in o.sample_modes}
        out = {}
        for mode, fn in fns.items():
            t0 = time.time()
            images = np.asarray(fn(list(data["caption"])))
            if images.dtype != np.uint8 or images.shape[0] != len(data["caption"]):
                raise ValueError(f"generator {mode!r} returned {images.shape} {images.dtype}; expected "
                                 f"uint8 [{len(data['caption'])}, H, W, 3]")
            out[mode] = images
            self.log(f"  generated {len(images)} images ({mode}) in {time.time() - t0:.1f}s")
        self._cache["generated"] = out
        return out

    def _inception(self):
        if "inception" not in self._cache:
            spec = resolve_inception_weights(self.opts.inception_weights)
            self._cache["inception"] = _inception_extractor(spec, self.opts.inception_batch,
                                                            self.opts.inception_size)
        return self._cache["inception"]

    def _fid_reference(self, extractor):
        o = self.opts
        if "fid_ref" not in self._cache:
            cache = os.path.join(report.eval_dir(self.workdir), f"fid_reference_{extractor.fingerprint}.npz")
            if o.fid_reference:
                self._cache["fid_ref"] = fid_lib.reference_statistics(
                    o.fid_reference, extractor, cache, key={"source": "folder"},
                    image_size=self.cfg.data.image_size, limit=o.num_generate)
            else:
                key = {"source": "heldout", "world_seed": self.cfg.data.get("world_seed", 0),
                       "image_size": self.cfg.data.image_size, "n": o.num_generate}
                self._cache["fid_ref"] = fid_lib.reference_statistics(
                    self._heldout(o.num_generate)["image"], extractor, cache, key=key)
        return self._cache["fid_ref"]

    # ---- one checkpoint -----------------------------------------------------------------
    def evaluate(self, step: Optional[int] = None) -> Dict[str, float]:
        o = self.opts
        step = self.load(step)
        self._cache.pop("generated", None)
        results: Dict[str, float] = {}
        timings = {}

        def run(name, fn):
            if name in o.evals:
                t0 = time.time()
                res = fn()
                results.update(res)
                timings[name] = time.time() - t0
                self.log(f"  {name} ({timings[name]:.1f}s): "
                         + ", ".join(f"{k} {v:.4g}" for k, v in sorted(res.items())[:12])
                         + (" ..." if len(res) > 12 else ""))

        def retrieval():
            d = self._heldout(o.num_examples)
            return suite.eval_retrieval(self.enc, d["image"], d["clip_tokens"])

        def zero_shot_():
            d = self._labelled("zero_shot", o.num_examples)
            if d is None:
                return {}
            held = d["labels"]["heldout_combo"].astype(bool)
            return suite.eval_zero_shot(self.enc, d["image"], d["labels"], subsets={
                "heldout_combos": held, "single_object": synthetic.single_object(d["labels"])})

        def few_shot():
            train, test = self._probe_sets()
            out = {}
            for suffix, (tr, te) in self._feature_sets().items():
                out.update(suite.eval_few_shot(tr, train, te, test, o.shots, o.seeds, o.l2_reg,
                                               suffix=suffix))
            return out

        def linear_probe():
            train, test = self._probe_sets()
            pcfg = probes.LinearProbeConfig(epochs=o.probe_epochs, batch_size=o.probe_batch,
                                            base_lr=o.probe_base_lr, warmup_epochs=o.probe_warmup_epochs,
                                            optimizer=o.probe_optimizer)
            out = {}
            for suffix, (tr, te) in self._feature_sets().items():
                out.update(suite.eval_linear_probe(tr, train, te, test, pcfg, suffix=suffix))
            return out

        def fid():
            ext = self._inception()
            ref = self._fid_reference(ext)
            gen = self._generated()
            out = suite.eval_fid(ext, ref, gen)
            if o.inception_weights and o.inception_weights.startswith("random"):
                out = {f"{k}/random_inception": v for k, v in out.items()}
            if o.inception_size != inception.INPUT_SIZE:
                out = {f"{k}/{o.inception_size}px": v for k, v in out.items()}
            return out

        def clip_score():
            d = self._heldout(o.num_generate)
            images = dict(self._generated(), real=d["image"])
            return suite.eval_clip_score(self.enc, images, list(d["caption"]), o.openclip_checkpoint)

        def compositional():
            d = self._labelled("compositional", o.num_generate)
            if d is None:
                return {}
            images = dict(self._generated(), real=d["image"])
            return suite.eval_compositional(images, d["labels"])

        self.log(f"evaluating {self.workdir} at step {step}")
        run("retrieval", retrieval)
        run("zero_shot", zero_shot_)
        run("few_shot", few_shot)
        run("linear_probe", linear_probe)
        run("fid", fid)
        run("clip_score", clip_score)
        run("compositional", compositional)
        settings = {k: (list(v) if isinstance(v, (tuple, list)) else v)
                    for k, v in dataclasses.asdict(o).items()}
        settings.update(timings_s=timings, use_ema=o.use_ema)
        report.write_step(self.workdir, step, results, settings)
        return results


def evaluate_workdir(workdir: str, opts: Optional[EvalOptions] = None, steps="latest",
                     log: Callable[[str], None] = print,
                     generate_fns: Optional[Mapping[str, Callable]] = None) -> Dict[int, Dict[str, float]]:
    """Evaluates checkpoints of ``workdir`` (``steps``: 'latest', 'all', an int or a list) and
    writes the reports. Returns {step: results}."""
    ev = WorkdirEvaluator(workdir, opts or EvalOptions(), log, generate_fns)
    available = ev.available_steps()
    if not available:
        raise FileNotFoundError(f"{workdir} has no complete checkpoint")
    if steps == "latest" or steps is None:
        chosen = [available[-1]]
    elif steps == "all":
        chosen = available
    else:
        chosen = [int(s) for s in (steps if isinstance(steps, (list, tuple)) else str(steps).split(","))]
        missing = sorted(set(chosen) - set(available))
        if missing:
            raise FileNotFoundError(f"no checkpoint at step(s) {missing}; available: {available}")
    out = {s: ev.evaluate(s) for s in chosen}
    paths = report.write_summary(ev.workdir)
    log(f"wrote {paths['json']}, {paths['markdown']}" + (f" and {len(paths['plots'])} plots" if paths["plots"] else ""))
    return out


# =============================================================================================
# CLI.
# =============================================================================================
def _define_flags():
    """Defines the CLI flags (each only if no other module of the process defined it already:
    ``dream_jax.sample`` shares several names with the same types)."""
    from absl import flags

    class _F:
        def __getattr__(self, kind):
            define = getattr(flags, kind)

            def f(name, *args, **kwargs):
                if name not in flags.FLAGS:
                    define(name, *args, **kwargs)
            return f

    F = _F()
    d = EvalOptions()
    F.DEFINE_string("workdir", None, "Training workdir.")
    F.DEFINE_list("evals", list(ALL_EVALS), f"Subset of {ALL_EVALS}.")
    F.DEFINE_string("steps", "latest", "'latest', 'all' or comma-separated checkpoint steps.")
    F.DEFINE_bool("use_ema", d.use_ema, "Evaluate the EMA weights.")
    F.DEFINE_integer("batch_size", d.batch_size, "Images per compiled encoder call.")
    F.DEFINE_integer("num_examples", d.num_examples, "Held-out pairs for retrieval / zero-shot.")
    F.DEFINE_enum("feature", d.feature, list(suite.FEATURE_KINDS), "Probe representation.")
    F.DEFINE_list("probe_tasks", list(d.probe_tasks), f"Synthetic probe tasks ({sorted(datasets.SYNTHETIC_TASKS)}).")
    F.DEFINE_integer("probe_train", d.probe_train, "Probe training examples.")
    F.DEFINE_integer("probe_test", d.probe_test, "Probe test examples.")
    F.DEFINE_list("shots", [str(s) for s in d.shots], "Few-shot k.")
    F.DEFINE_list("seeds", [str(s) for s in d.seeds], "Few-shot seeds.")
    F.DEFINE_string("l2_reg", "auto", "Few-shot ridge regulariser: a number, or 'auto' (chosen per "
                    "support set by leave-one-out error).")
    F.DEFINE_integer("probe_epochs", d.probe_epochs, "Linear-probe epochs.")
    F.DEFINE_integer("probe_batch", d.probe_batch, "Linear-probe batch size.")
    F.DEFINE_float("probe_base_lr", d.probe_base_lr, "Linear-probe base lr (x batch / 256).")
    F.DEFINE_integer("probe_warmup_epochs", d.probe_warmup_epochs, "Linear-probe warm-up epochs.")
    F.DEFINE_enum("probe_optimizer", d.probe_optimizer, ["lars", "sgd"], "Linear-probe optimizer.")
    F.DEFINE_string("probe_tfds", None, "TFDS (array_record) dataset for the probes, e.g. imagenet2012.")
    F.DEFINE_string("probe_data_dir", None, "TFDS data_dir.")
    F.DEFINE_list("baselines", list(d.baselines), f"Probe baselines from {BASELINES}.")
    F.DEFINE_integer("num_generate", d.num_generate, "Held-out prompts to generate for.")
    F.DEFINE_list("sample_modes", list(d.sample_modes), "Decoding modes (plain, sad, greedy, best_of_k).")
    F.DEFINE_float("cfg", d.cfg, "Guidance scale.")
    F.DEFINE_enum("cfg_schedule", d.cfg_schedule, ["linear", "constant"], "How the guidance scale grows.")
    F.DEFINE_integer("num_iter", d.num_iter, "MAR iterations.")
    F.DEFINE_string("diffusion_steps", d.diffusion_steps, "Diffusion-head respacing.")
    F.DEFINE_integer("sad_candidates", d.sad_candidates, "SAD candidates.")
    F.DEFINE_string("sad_step", None, "SAD threshold: iterations (int) or fraction decoded (float < 1).")
    F.DEFINE_float("temperature", d.temperature, "Sampling temperature.")
    F.DEFINE_integer("gen_batch", d.gen_batch, "Generation rows per compiled call.")
    F.DEFINE_integer("gen_seed", d.gen_seed, "Generation seed.")
    F.DEFINE_string("inception_weights", None, "torch-fidelity's Inception .pth (or .npz); 'random' for smoke tests.")
    F.DEFINE_string("fid_reference", None, "Folder of real reference images (default: held-out images).")
    F.DEFINE_integer("inception_batch", d.inception_batch, "Inception batch (sharded over devices).")
    F.DEFINE_integer("inception_size", d.inception_size, "Inception input size (299 = FID; less: smoke tests).")
    F.DEFINE_string("openclip_checkpoint", None, "External OpenCLIP checkpoint (unsupported: raises).")


def options_from_flags() -> EvalOptions:
    from absl import flags

    FL = flags.FLAGS
    return EvalOptions(
        evals=tuple(FL.evals), use_ema=FL.use_ema, batch_size=FL.batch_size, num_examples=FL.num_examples,
        feature=FL.feature, probe_tasks=tuple(FL.probe_tasks), probe_train=FL.probe_train,
        probe_test=FL.probe_test, shots=tuple(int(s) for s in FL.shots),
        seeds=tuple(int(s) for s in FL.seeds), l2_reg=_parse_l2_reg(FL.l2_reg), probe_epochs=FL.probe_epochs,
        probe_batch=FL.probe_batch, probe_base_lr=FL.probe_base_lr,
        probe_warmup_epochs=FL.probe_warmup_epochs, probe_optimizer=FL.probe_optimizer,
        probe_tfds=FL.probe_tfds, probe_data_dir=FL.probe_data_dir, baselines=tuple(FL.baselines),
        num_generate=FL.num_generate, sample_modes=tuple(FL.sample_modes), cfg=FL.cfg,
        cfg_schedule=FL.cfg_schedule,
        num_iter=FL.num_iter, diffusion_steps=FL.diffusion_steps, sad_candidates=FL.sad_candidates,
        sad_step=None if FL.sad_step in (None, "") else float(FL.sad_step), temperature=FL.temperature, gen_batch=FL.gen_batch, gen_seed=FL.gen_seed,
        inception_weights=FL.inception_weights, fid_reference=FL.fid_reference,
        inception_batch=FL.inception_batch, inception_size=FL.inception_size,
        openclip_checkpoint=FL.openclip_checkpoint)


def main(argv=None) -> Dict[int, Dict[str, float]]:
    """The CLI body (flags already parsed): evaluates, prints the latest results and the
    probe-vs-baseline table, returns {step: results}."""
    from absl import flags

    FL = flags.FLAGS
    if not FL.workdir:
        raise ValueError("--workdir is required")
    steps = FL.steps if FL.steps in ("latest", "all") else [int(s) for s in FL.steps.split(",")]
    results = evaluate_workdir(FL.workdir, options_from_flags(), steps)
    last = max(results)
    print(report.markdown_table({last: results[last]}))
    comparison = report.probe_comparison(results[last])
    if comparison:
        print("Probe accuracy: the model's features vs baselines\n" + comparison)
    return results


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(lambda argv: main(argv) and None)
