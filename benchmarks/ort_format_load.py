"""Session load time by graph format (issue 15: "pre-optimised graphs in ONNX Runtime's own format, loaded without copies, where faster").

    python benchmarks/ort_format_load.py EXPORT/unet/model.onnx   # one graph; prints median ms of 5 loads per format

Formats: the exported ``.onnx`` optimized at load (``ORT_ENABLE_ALL``); the same graph optimized
offline and saved as ``.onnx`` (what ``trt-bgswap build`` writes), loaded without optimization; saved
in ONNX Runtime's own format (``session.save_model_format=ORT``); and that ``.ort`` file's bytes used
directly for the graph and the initializers (``session.use_ort_model_bytes_directly`` /
``session.use_ort_model_bytes_for_initializers``: no copies). Writes its files to the working folder.
"""
import time, onnxruntime as ort, statistics, sys, os
src = sys.argv[1]
name = os.path.basename(os.path.dirname(src))
def so_base(level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions(); so.log_severity_level = 3; so.intra_op_num_threads = 2; so.graph_optimization_level = level; return so
# offline optimized ONNX and ORT format
opt_onnx, opt_ort = f"{name}.opt.onnx", f"{name}.opt.ort"
so = so_base(); so.optimized_model_filepath = opt_onnx; ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
so = so_base(); so.optimized_model_filepath = opt_ort; so.add_session_config_entry("session.save_model_format", "ORT"); ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
def t(fn, n=5):
    xs=[]
    for _ in range(n):
        a=time.perf_counter(); fn(); xs.append(time.perf_counter()-a)
    return statistics.median(xs)
noopt = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
r = {
 "exported .onnx, optimize at load": t(lambda: ort.InferenceSession(src, so_base(), providers=["CPUExecutionProvider"])),
 "pre-optimized .onnx (level disable)": t(lambda: ort.InferenceSession(opt_onnx, so_base(noopt), providers=["CPUExecutionProvider"])),
 "pre-optimized .ort": t(lambda: ort.InferenceSession(opt_ort, so_base(noopt), providers=["CPUExecutionProvider"])),
}
data = open(opt_ort, "rb").read()
def direct():
    so = so_base(noopt); so.add_session_config_entry("session.use_ort_model_bytes_directly", "1"); so.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
r[".ort bytes used directly (no copies)"] = t(direct)
print(name, os.path.getsize(src), {k: round(v*1000, 1) for k, v in r.items()}, "load", os.getloadavg()[0])
