"""Edge targets checked by their own tools: Vela (Arm Ethos-U) and TFLite Micro."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from export_helpers import pixels, tiny_model

from export import __main__ as cli
from export import edge, quantize, rewrite, tflite
from export.evaluate import TFLiteClassifier
from export.pipeline import export_model

CALIBRATION = pixels(16)


@pytest.fixture(scope="module")
def relu_int8():
    model = tiny_model(activation="relu", kernel_size=3)
    return tflite.convert(model, "int8", calibration_images=CALIBRATION)


def _int8_with_sqrt() -> bytes:
    """A tiny int8 file whose SQRT Vela cannot run on an Ethos-U55 (it stays on the CPU)."""
    inputs = keras.Input((8, 8, 3), batch_size=1)
    x = keras.layers.Conv2D(4, 1)(inputs)
    outputs = keras.ops.sqrt(keras.ops.abs(x) + 1.0)
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None, :8, :8]] for x in CALIBRATION)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def test_vela_puts_a_relu_convmixer_on_the_npu(relu_int8):
    optimized, report = edge.run_vela(relu_int8, "ethos-u55-128")
    # Read from Vela's own file: one NPU custom op, nothing left for the CPU.
    assert tflite.summarize(optimized).ops == (edge.ETHOSU_OP,)
    assert report["cpu_ops"] == [] and report["npu_op_share"] == 1.0
    # Vela counts its own operators (it may split one, e.g. MEAN), at least the file's.
    assert report["npu_ops"] >= len(tflite.summarize(relu_int8).ops)
    assert report["system_config"] == "Ethos_U55_High_End_Embedded"
    assert report["inference_ms"] > 0 and report["cycles_total"] > 0 and report["sram_kib"] > 0
    assert report["macs"] > 0 and report["off_chip_flash_kib"] > 0


def test_vela_names_the_ops_it_leaves_on_the_cpu():
    optimized, report = edge.run_vela(_int8_with_sqrt(), "ethos-u55-128")
    assert report["cpu_ops"] == ["SQRT"]
    assert "SQRT" in tflite.summarize(optimized).ops
    assert 0 < report["npu_op_share"] < 1


def test_vela_reports_an_unknown_system_config(relu_int8):
    with pytest.raises(ValueError, match="Vela rejected an option for ethos-u55-128: .*No_Such_"):
        edge.run_vela(relu_int8, "ethos-u55-128", system_config="No_Such_System")


def test_tflm_runs_a_relu_file_as_litert_does(relu_int8):
    report = edge.run_tflm(relu_int8, CALIBRATION[:6])
    assert report["runs"] and report["n"] == 6
    # TFLM's kernels descend from TFLite's reference kernels: equal, or (seen on some random
    # tiny models) one output step apart.
    assert report["max_abs_diff_vs_litert_reference_kernels"] <= 1
    assert report["top1_agreement_vs_litert"] >= 0.8  # XNNPACK rounds differently
    arena = report["arena_bytes"]
    # The arena it reports is the smallest that works: a tenth less does not allocate.
    with pytest.raises(RuntimeError):
        with edge._captured_fds():
            edge._tflm_interpreter(relu_int8, int(arena * 0.9)).invoke()


def test_tflm_says_why_a_gelu_file_cannot_run():
    blob = tflite.convert(tiny_model(kernel_size=3), "int8", calibration_images=CALIBRATION)
    report = edge.run_tflm(blob, CALIBRATION[:2])
    assert report == {
        "runs": False,
        "missing_ops": ["GELU"],
        "reason": "TFLite Micro has no kernel for GELU",
        "change": edge._ADVICE["GELU"],
    }
    assert edge.tflm_ops_check(blob)["missing_ops"] == ["GELU"]


def test_micro_chain_needs_the_cpu_ops_in_tflm():
    missing_gelu = {"runs": False, "missing_ops": ["GELU"], "reason": "..."}
    on_npu = {"cpu_ops": []}
    on_cpu = {"cpu_ops": ["GELU", "SQRT"]}
    assert edge.micro_chain(on_npu, missing_gelu)["works"] is True
    chain = edge.micro_chain(on_cpu, missing_gelu)
    assert chain["works"] is False and chain["cpu_ops_missing_in_tflm"] == ["GELU"]
    assert edge.micro_chain(on_cpu, {"runs": True, "missing_ops": []})["works"] is True


def test_targets_get_the_untiled_graph_and_files_beside_the_export(tmp_path):
    model = tiny_model(kernel_size=9, activation="relu")
    output = tmp_path / "m_int8.tflite"
    result = export_model(
        model, "int8", output, calibration_images=CALIBRATION,
        targets=["ethos-u55-128", "tflm"], tflm_images=4,
    )  # fmt: skip
    targets = result.report["targets"]
    # The XNNPACK file is tiled (3x3 tiles: nine depthwise convs per block) ...
    # (one per BatchNorm: the stem's and two per block but the last, folded into the head;
    # 9 tiles per 9x9 conv, 2 blocks)
    assert tflite.summarize(result.blob).ops.count("DEPTHWISE_CONV_2D") == 1 + 3 + 2 * 9
    # ... the NPU and microcontroller get the plain 9x9 convs (docs/export.md: smaller, faster).
    micro = (tmp_path / "m_int8.tflm.tflite").read_bytes()
    assert targets["tflm"]["graph"] == "untiled depthwise convs"
    assert targets["tflm"]["output"] == str(tmp_path / "m_int8.tflm.tflite")
    assert tflite.summarize(micro).ops.count("DEPTHWISE_CONV_2D") == 1 + 3 + 2
    assert targets["tflm"]["runs"]
    assert targets["tflm"]["max_abs_diff_vs_litert_reference_kernels"] <= 1
    vela_file = tmp_path / "m_int8.ethos-u55-128.tflite"
    assert targets["ethos-u55-128"]["output"] == str(vela_file)
    assert tflite.summarize(vela_file.read_bytes()).ops == (edge.ETHOSU_OP,)
    assert targets["ethos-u55-128"]["tflm_chain"]["works"] is True


def test_cli_targets(tmp_path, capfd):
    model_path = tmp_path / "tiny.keras"
    tiny_model(activation="relu", kernel_size=3, num_classes=2).save(model_path)
    images = tmp_path / "data"
    for seed, label in enumerate(("a", "b")):
        (images / label).mkdir(parents=True)
        for i, image in enumerate(pixels(4, seed=seed)):
            keras.utils.save_img(images / label / f"{i}.png", image)
    output = tmp_path / "tiny_int8.tflite"
    status = cli.main(
        ["--model", str(model_path), "--format", "int8", "--output", str(output),
         "--data-dir", str(images), "--calibration-images", "8", "--target", "ethos-u65-256",
         "--target", "tflm", "--tflm-images", "3"]
    )  # fmt: skip
    out, _ = capfd.readouterr()
    assert status == 0, out
    report = json.loads(out.splitlines()[-1])
    assert set(report["targets"]) == {"ethos-u65-256", "tflm"}
    assert report["targets"]["tflm"]["graph"] == "the main output"
    assert report["targets"]["ethos-u65-256"]["system_config"] == "Ethos_U65_Client_Server"
    assert (tmp_path / "tiny_int8.ethos-u65-256.tflite").exists()
    assert not (tmp_path / "tiny_int8.tflm.tflite").exists()  # the main file is the TFLM one


def test_cli_refuses_targets_for_float_files(tmp_path, capfd):
    (tmp_path / "m.keras").write_bytes(b"never read: the request is refused first")
    status = cli.main(
        ["--model", str(tmp_path / "m.keras"), "--format", "fp32", "--output",
         str(tmp_path / "m.tflite"), "--target", "tflm"]
    )  # fmt: skip
    _, err = capfd.readouterr()
    assert status == 2
    assert "need a fully-integer file: format int8 or qat" in err.strip().splitlines()[-1]


def test_missing_tool_is_named(monkeypatch):
    monkeypatch.setattr(edge.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install ethos-u-vela==5.2.0"):
        edge.check_targets(["ethos-u55-128"], "int8")
    with pytest.raises(ValueError, match="TFLite Micro is not installed"):
        edge.check_targets(["tflm"], "qat")
    assert edge.check_targets([], "fp32") == []


def test_vela_targets_are_velas_own():
    from ethosu.vela.architecture_features import Accelerator

    from export.constants import VELA_TARGETS

    assert set(VELA_TARGETS) == {a.value for a in Accelerator}


@pytest.mark.slow
def test_sigmoid_gelu_runs_in_tflm_as_int8_and_qat():
    """--gelu sigmoid: a GELU model's int8 and QAT files hold LOGISTIC + MUL, which TFLM has;
    the QAT file computes what its fake-quant model computes."""
    model = tiny_model(kernel_size=3, num_classes=4)
    labels = np.arange(len(CALIBRATION)) % 4
    data = tf.data.Dataset.from_tensor_slices((CALIBRATION, labels)).batch(8)
    int8 = export_model(model, "int8", calibration_images=CALIBRATION, gelu="sigmoid",
                        targets=["tflm"], tflm_images=4)  # fmt: skip
    assert "GELU" not in int8.report["ops"] and {"LOGISTIC", "MUL"} <= set(int8.report["ops"])
    assert int8.report["gelu"] == "sigmoid" and int8.report["targets"]["tflm"]["runs"]

    silu = rewrite.gelu_as_silu(model)
    qat_model = quantize.quantize_model(silu, calibration_images=CALIBRATION)
    quantize.finetune(qat_model, data, steps=2, learning_rate=1e-5)
    blob = tflite.convert(quantize.rebatch_qat_model(qat_model), "qat",
                          calibration_images=CALIBRATION)  # fmt: skip
    assert tflite.integer_problems(blob) == [] and "LOGISTIC" in tflite.summarize(blob).ops
    report = edge.run_tflm(blob, CALIBRATION)
    assert report["runs"] and report["max_abs_diff_vs_litert_reference_kernels"] <= 1
    fake_quant = np.asarray(qat_model(CALIBRATION, training=False))
    int8_logits = TFLiteClassifier(blob).predict(CALIBRATION)
    scale = tflite.summarize(blob).output_quantization[0]
    assert np.abs(int8_logits - fake_quant).max() <= 0.05 * np.abs(fake_quant).max() + 2 * scale
