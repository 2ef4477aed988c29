"""The ``nbcnn`` command: train, evaluate, predict, export, profile, bench, info.

Exit status 0 on success, 2 on a usage error or an unavailable device, with one line
saying what was wrong and what to do; never a traceback for a user's mistake.
"""

import argparse
import os
import platform
import sys

from nbcnn.checks import check_int, check_real

EXIT_USAGE = 2


def _option(convert, check, **bounds):
    """An argparse type: ``convert`` the text, then ``check`` it (``nbcnn.checks``) within ``bounds``;
    text that does not convert is checked as it is, so it gets the check's own wording."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = text
        try:
            return check(None, None, value, **bounds)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


_positive_int = _option(int, check_int, minimum=1)
_non_negative_int = _option(int, check_int, minimum=0)
_positive_float = _option(float, check_real, minimum=0.0, open_min=True)
_non_negative_float = _option(float, check_real, minimum=0.0)
_fraction = _option(float, check_real, minimum=0.0, maximum=1.0, open_min=True)  # in (0, 1]


def _compute_capability(text):
    """'9.0' -> (9, 0), for the compute capabilities the static profile knows."""
    from nbcnn.perf.static import SM_LIMITS

    parts = text.split(".")
    known = ", ".join(f"{a}.{b}" for a, b in sorted(SM_LIMITS))
    try:
        cc = (int(parts[0]), int(parts[1])) if len(parts) == 2 else None
    except ValueError:
        cc = None
    if cc not in SM_LIMITS:
        raise argparse.ArgumentTypeError(f"expected a compute capability, one of {known}; got {text!r}")
    return cc


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line (what was wrong, and where the help is) and exit 2."""

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser():
    from nbcnn.models import MODELS

    parser = _Parser(prog="nbcnn", description="Numba kernels for CNNs: train, evaluate, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a CNN on MNIST (or any MNIST-format data set)")
    t.add_argument("--device", default="auto", help="auto (default: CUDA when usable, else CPU), cpu or cuda")
    t.add_argument("--epochs", type=_positive_int, default=None, help="epochs (default: the model's, else 4)")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="default: the model's, else 64")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate: the step schedule's first, the others' peak (default: the model's, else 1e-3)")
    t.add_argument("--lr-decay", type=_fraction, default=None,
                   help="with --schedule step: factor applied after each epoch (default 0.5; 1 keeps it constant)")
    t.add_argument("--schedule", default=None, choices=["step", "cosine", "onecycle"],
                   help="learning-rate schedule (default: the model's, else step)")
    t.add_argument("--warmup", type=_non_negative_float, default=None,
                   help="epochs of linear warm-up before a step or cosine schedule (default 0)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="shift every training image at random by up to 2 pixels (and mirror colour images); "
                        "default: the model's (on for resnet), else off")
    t.add_argument("--label-smoothing", type=_option(float, check_real, minimum=0.0, maximum=1.0),
                   default=None, metavar="E",
                   help="train against targets of 1 - E on the label and E/classes on every class (default: the "
                        "model's, else 0)")
    t.add_argument("--clip-grad-norm", type=_positive_float, default=None, metavar="NORM",
                   help="scale the gradients down together where their norm exceeds NORM (default: no clipping)")
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--data-dir", default=None, help="folder with the four MNIST-format IDX files, or with one "
                                                   "sub-folder of images per class (default: the shipped MNIST)")
    t.add_argument("--image-size", type=_positive_int, default=None,
                   help="with a folder of images: the side they are resized to (default: their most common size)")
    t.add_argument("--out", default="runs/mnist", help="where metrics.json, model.npz and curves.png go")
    t.add_argument("--resume", action="store_true", help="continue from the last finished epoch in --out")
    t.add_argument("--model", default="lenet", choices=sorted(MODELS))
    t.add_argument("--optimizer", default=None, choices=["adam", "adamw", "sgd"],
                   help="default: the model's, else adam")
    t.add_argument("--weight-decay", type=_non_negative_float, default=None,
                   help="AdamW's decoupled decay, SGD's L2 term (default: the model's, else 0)")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks of an MPI job: mpiexec -n R nbcnn train --distributed ...")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="test accuracy of a saved model")
    e.add_argument("--checkpoint", required=True, help="a model.npz written by nbcnn train")
    e.add_argument("--device", default="auto")
    e.add_argument("--data-dir", default=None)

    r = sub.add_parser("predict", help="classify image files with a trained model")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, anything Pillow reads)")
    r.add_argument("--checkpoint", required=True, help="a model.npz written by nbcnn train")
    r.add_argument("--device", default="auto")
    r.add_argument("--top", type=_positive_int, default=1, help="how many of the most probable classes to show")
    r.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    r.add_argument("--no-fit", action="store_true",
                   help="only pad and resize: do not frame the ink as the training images had it")

    x = sub.add_parser("export", help="write a trained model as ONNX (needs the onnx extra)")
    x.add_argument("--checkpoint", required=True, help="a model.npz written by nbcnn train")
    x.add_argument("--output", required=True, help="the .onnx file to write")

    p = sub.add_parser("profile", help="time each layer and kernel of one training step")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="lenet", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--repeats", type=_positive_int, default=10, help="steps timed after warm-up (median)")
    p.add_argument("--json", default=None, help="write the figures as JSON here")
    p.add_argument("--trace", default="runs/profile/trace.json",
                   help="Chrome trace of one step (chrome://tracing, ui.perfetto.dev)")
    p.add_argument("--static", action="store_true",
                   help="no timing and no GPU: compile every CUDA kernel for --cc and report registers, spills, "
                        "shared memory, occupancy and SASS instructions per FMA of its hottest loop")
    p.add_argument("--cc", type=_compute_capability, default=(9, 0),
                   help="with --static: the compute capability, MAJOR.MINOR (default 9.0, the H100)")
    p.add_argument("--kernel", action="append", default=None, metavar="NAME",
                   help="with --static: only this kernel (repeat for several; default: all)")

    b = sub.add_parser("bench", help="a fixed suite of kernels, training epochs and (on the CPU) public-API steps, "
                                         "optionally against PyTorch")
    b.add_argument("--device", default="auto")
    b.add_argument("--vs", choices=["torch"], default=None, help="time the same work in PyTorch, interleaved")
    b.add_argument("--json", default=None, help="write the table as JSON here")
    b.add_argument("--repeats", type=_positive_int, default=7, help="timed runs per kernel row (median)")
    b.add_argument("--epoch-images", type=_positive_int, default=60000,
                   help="images in each timed training epoch (default: all of MNIST's 60,000)")

    sub.add_parser("info", help="versions, devices, threads")
    return parser


def cmd_profile(args):
    if args.static:
        return _static_profile(args)
    from nbcnn.perf.profile import format_profile, profile_step, write_json

    report = profile_step(args.model, args.device, args.batch_size, args.repeats)
    print(format_profile(report))
    write_json(args.trace, report.pop("trace"))
    print(f"\nChrome trace of the step: {args.trace}")
    if args.json:
        write_json(args.json, report)
        print(f"figures: {args.json}")
    return 0


def _static_profile(args):
    from nbcnn.perf.profile import write_json
    from nbcnn.perf.static import StaticProfileError, format_rows, static_profile

    try:
        rows = static_profile(args.cc, names=args.kernel)
    except StaticProfileError as exc:
        return _fail(args, exc, EXIT_USAGE)
    print(format_rows(rows, args.cc))
    if args.json:
        write_json(args.json, rows)
        print(f"figures: {args.json}")
    return 0


def cmd_bench(args):
    from nbcnn.perf.bench import format_bench, run_bench
    from nbcnn.perf.profile import write_json

    report = run_bench(args.device, vs=args.vs, repeats=args.repeats, epoch_images=args.epoch_images)
    print(format_bench(report))
    if args.json:
        write_json(args.json, report)
        print(f"figures: {args.json}")
    return 0


def cmd_train(args):
    from nbcnn.train import Config, train

    cfg = Config(device=args.device, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 lr_decay=args.lr_decay, seed=args.seed, data_dir=args.data_dir, out=args.out, resume=args.resume,
                 model=args.model, optimizer=args.optimizer, progress=not args.no_progress, schedule=args.schedule,
                 warmup=args.warmup, augment=args.augment, weight_decay=args.weight_decay,
                 image_size=args.image_size, distributed=args.distributed, label_smoothing=args.label_smoothing,
                 clip_grad_norm=args.clip_grad_norm)
    metrics = train(cfg)
    from nbcnn.distributed import environment_rank

    if metrics and environment_rank() == 0:
        last = metrics[-1]
        print(f"done: test accuracy {100 * last['test_accuracy']:.2f}% after {last['epoch']} epochs; "
              f"model in {os.path.join(args.out, 'model.npz')}")
    return 0


def cmd_evaluate(args):
    from nbcnn.train import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, device=args.device, data_dir=args.data_dir)
    return 0


def cmd_predict(args):
    import json

    from nbcnn.predict import format_predictions, predict

    results = predict(args.checkpoint, args.images, device=args.device, top=args.top, fit=not args.no_fit)
    if args.json:  # a JSON list, one image's object per line
        print("[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]")
    else:
        print(format_predictions(results))
    return 0


def cmd_export(args):
    from nbcnn.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.output)
    return 0


def cmd_info(args):
    import numba
    import numpy as np

    import nbcnn
    from nbcnn.device import cuda_unavailable_reason

    lines = [
        f"nbcnn {nbcnn.__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()}), {os.cpu_count()} CPUs",
        f"numpy {np.__version__}, numba {numba.__version__}",
    ]
    try:
        from importlib.metadata import version

        lines.append(f"numba-cuda {version('numba-cuda')}")
    except Exception:
        lines.append("numba-cuda: not installed")
    lines.append(f"numba threads: {numba.get_num_threads()} (NUMBA_NUM_THREADS to change)")
    if nbcnn.BLAS_THREAD_TIMEOUT is None:
        lines.append("OpenBLAS threads: spin after each product (NumPy's BLAS, loaded before nbcnn, could not "
                     "be told otherwise); export OPENBLAS_THREAD_TIMEOUT=4 for faster CPU steps")
    else:
        lines.append(f"OpenBLAS threads: sleep after 2**{nbcnn.BLAS_THREAD_TIMEOUT} cycles (OPENBLAS_THREAD_TIMEOUT)")
    try:
        from nbcnn.kernels.activation import relu_forward_cpu

        relu_forward_cpu(np.zeros(4, np.float32), np.zeros(4, np.float32))  # starts the thread pool
        lines.append(f"numba threading layer: {numba.threading_layer()}")
    except Exception as exc:
        lines.append(f"numba threading layer: unknown ({exc})")
    reason = cuda_unavailable_reason()
    if reason is None:
        from nbcnn.device import SIMULATOR

        if SIMULATOR:
            lines.append("CUDA: the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): kernels run as Python, slowly")
        else:
            from numba import cuda

            dev = cuda.get_current_device()
            lines.append(f"CUDA: usable, {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, "
                         f"compute capability {dev.compute_capability}")
    else:
        lines.append(f"CUDA: not usable: {reason}")
    print("\n".join(lines))
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from nbcnn.errors import DataError
    from nbcnn.device import CudaUnavailableError
    from nbcnn.model import WriteError

    try:
        commands = {"train": cmd_train, "evaluate": cmd_evaluate, "info": cmd_info, "profile": cmd_profile,
                    "bench": cmd_bench, "predict": cmd_predict, "export": cmd_export}
        return commands[args.command](args)
    except CudaUnavailableError as exc:
        return _fail(args, exc, EXIT_USAGE)
    except (DataError, FileNotFoundError, ValueError, TypeError, FloatingPointError) as exc:
        return _fail(args, exc, EXIT_USAGE)
    except WriteError as exc:  # a disk that filled up during training: the last good files are kept
        return _fail(args, exc, 1)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except Exception:  # a bug, not a mistake: its traceback, but in an MPI job also the end of the job
        from nbcnn import distributed

        if distributed.ACTIVE is not None:
            import traceback

            traceback.print_exc()
            return _fail(args, "the error above", 1)
        raise


def _fail(args, problem, code):
    """Say what went wrong in one line on stderr, and return the exit status. In an MPI job whose ranks
    already work together (``distributed.ACTIVE``), the failing rank says it and ends the job (the
    others would wait for it forever); before that every rank fails alike and rank 0 alone says it."""
    from nbcnn import distributed

    text = f"nbcnn {args.command}: {'error: ' if code != 130 else ''}{problem}"
    group = distributed.ACTIVE
    if group is not None:
        print(f"{text} (rank {group.rank} of {group.size}; ending the job)", file=sys.stderr, flush=True)
        group.abort(code)
    if distributed.environment_rank() == 0:
        print(text, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
