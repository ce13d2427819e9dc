"""Each kind of impossible input a careless user or a broken tool gave loom,
with its right outcome: exit 2 naming the file or flag and the field (never a
plan with a negative layer count or a traceback), or, where the input is
legal, a plan."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.cost.compute import model_flops_per_token
from loom.planner.specs.model import model_from_hf_config

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

DEEPSEEK_V3 = json.loads((ROOT / "profiles" / "models" / "deepseek-v3.json").read_text())
LLAMA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 688, "vocab_size": 1000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
CLUSTER = {"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
JOB = {"model": "config.json", "cluster": "cluster.yaml", "global_batch_size": 32, "seq_length": 1024}


def run(folder: Path, *args: str, config: dict | None = None, cluster: dict | None = None, job: dict | None = None,
        raw_job: bytes | None = None):
    """``loom evaluate job.yaml ARGS`` in ``folder`` on the given files."""
    (folder / "config.json").write_text(json.dumps(LLAMA if config is None else config))
    (folder / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER if cluster is None else cluster))
    (folder / "job.yaml").write_bytes(raw_job if raw_job is not None else yaml.safe_dump(JOB if job is None else job).encode())
    return runner.invoke(app, ["evaluate", str(folder / "job.yaml"), "--json", *args])


def assert_bad(result, *names: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(name in result.stderr for name in names), result.stderr


# --- model configs -------------------------------------------------------------------
@pytest.mark.parametrize("change, field", [
    ({"first_k_dense_replace": 70}, "first_k_dense_replace"),  # DeepSeek-V3 has 61 layers: -9 MoE layers
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ({"n_routed_experts": "16"}, "n_routed_experts"),  # a string is not a count
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),  # a non-empty string is not False
    ({"rope_theta": "5e5x"}, "rope_theta"),
    ({"model_type": ["deepseek_v3"]}, "model_type"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),  # more than the 256 experts
])
def test_a_deepseek_v3_config_that_cannot_be(tmp_path, change, field):
    assert_bad(run(tmp_path, "--tp", "8", config={**DEEPSEEK_V3, **change}), "config.json", field)


@pytest.mark.parametrize("change, field", [
    ({"hidden_dropout": 5.0}, "hidden_dropout"),
    ({"vocab_size": 4}, "vocab_size"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers"),
    ({"hidden_size": True}, "hidden_size"),
    # fields that change the model a launch file would train: refused, not dropped
    ({"hidden_act": "gelu"}, "hidden_act"),  # GeGLU in transformers; loom writes --swiglu
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),  # biases dropped from train.sh and the parameter count
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "rope_scaling.low_freq_factor"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
])
def test_a_llama_config_that_cannot_be(tmp_path, change, field):
    assert_bad(run(tmp_path, config={**LLAMA, **change}), "config.json", field)


def test_a_yarn_llama_config_is_refused_for_megatron_only(tmp_path):
    """YaRN on a standard attention has no Megatron-LM flag: the Megatron job
    names its framework and the one that can run it; DeepSpeed plans it."""
    config = {**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert_bad(run(tmp_path, config=config), "job.yaml", "framework", "expected deepspeed for", "YaRN")
    assert run(tmp_path, "--framework", "deepspeed", config=config).exit_code == 0


def test_llama_3_1_rope_scaling_reaches_the_launch_file(tmp_path):
    """Llama 3.1's rope_scaling (rope_type llama3, megatron-core's fixed
    low/high factors and 8,192 original positions) is written as
    --use-rope-scaling with its factor."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    result = run(tmp_path, "--tp", "2", "--out", str(tmp_path / "out"), config={**LLAMA, "rope_scaling": scaling})
    assert result.exit_code == 0, result.output
    assert "--use-rope-scaling --rope-scaling-factor 8 " in " ".join((tmp_path / "out" / "train.sh").read_text().split()) + " "


def test_a_window_as_wide_as_the_sequence_is_no_window(tmp_path):
    """Mistral 7B v0.1's 4,096-key window at a 4,096-token sequence (JOB's
    1,024 at a 1,024-key window here) masks nothing: context parallelism is
    allowed and no --window-size is written."""
    config = {**LLAMA, "model_type": "mistral", "sliding_window": JOB["seq_length"]}
    result = run(tmp_path, "--tp", "1", "--cp", "2", "--out", str(tmp_path / "out"), config=config)
    assert result.exit_code == 0, result.output
    assert "--window-size" not in (tmp_path / "out" / "train.sh").read_text()
    assert_bad(run(tmp_path, "--tp", "1", "--cp", "2", config={**config, "sliding_window": JOB["seq_length"] // 2}), "--cp")


def test_mistrals_sliding_window_is_priced_and_written(tmp_path):
    """Mistral 7B v0.1 windows every layer at 4,096 keys (transformers'
    MistralAttention): cheaper attention past the window, and --window-size."""
    steps = {}
    for window in (None, 256):
        folder = tmp_path / str(window)
        folder.mkdir()
        config = {**LLAMA, "model_type": "mistral", "sliding_window": window}  # null: no window
        result = run(folder, "--tp", "1", "--out", str(folder / "out"), config=config)
        assert result.exit_code == 0, result.output
        steps[window] = json.loads(result.stdout)["plans"][0]["predicted"]["breakdown_s"]["compute_forward"]
        assert ("--window-size 255,0" in " ".join((folder / "out" / "train.sh").read_text().split())) == bool(window)
    assert steps[256] < steps[None]
    # MFU counts the window's keys, not the sequence's: 1,024 tokens see at most 256 keys each in every layer
    windowed, full = (model_from_hf_config({**LLAMA, "model_type": "mistral", **extra}, name="m", source="t")
                      for extra in ({"sliding_window": 256}, {"sliding_window": None}))
    per_key = 6.0 * LLAMA["num_attention_heads"] * 2 * (LLAMA["hidden_size"] // LLAMA["num_attention_heads"]) * LLAMA["num_hidden_layers"]
    assert model_flops_per_token(full, 1024) - model_flops_per_token(windowed, 1024) == pytest.approx(per_key * (1024 - 256))


def test_moe_layer_freq_other_than_1_is_refused(tmp_path):
    """DeepSeek's moe_layer_freq 2 (every other layer MoE) is not what
    loom's layer split models: refused, not planned as if it were 1."""
    assert_bad(run(tmp_path, "--tp", "8", config={**DEEPSEEK_V3, "moe_layer_freq": 2}), "config.json", "moe_layer_freq")


def test_an_integer_of_5000_digits_is_bad_input(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}")
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(JOB))
    assert_bad(runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml")]), "config.json", "4,300 digits")


def test_an_ffn_narrower_than_tp_is_refused_not_divided_by_zero(tmp_path):
    assert_bad(run(tmp_path, "--tp", "8", config={**LLAMA, "intermediate_size": 4}), "--tp")


MIXTRAL = {"model_type": "mixtral", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
           "intermediate_size": 688, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 1000, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5}


def test_an_ffn_width_tp_does_not_divide_is_refused_naming_tp(tmp_path):
    """Megatron splits the FFN evenly over TP (divide() asserts it); 7 // 2
    would have been priced and 7 // 8 divided by zero (exit 4)."""
    config = {**LLAMA, "num_key_value_heads": 8, "intermediate_size": 7}
    assert_bad(run(tmp_path, "--tp", "8", "--dp", "1", config=config), "--tp", "FFN width 7")
    assert_bad(run(tmp_path, "--tp", "2", "--dp", "1", config=config), "--tp", "FFN width 7")


@pytest.mark.parametrize("config", [{**LLAMA, "num_key_value_heads": 8, "intermediate_size": 7},
                                    {**MIXTRAL, "intermediate_size": 7}], ids=["dense", "moe"])
def test_a_tiny_ffn_plans_only_layouts_whose_tp_divides_it(tmp_path, config):
    run(tmp_path, config=config)  # writes the files
    result = runner.invoke(app, ["plan", str(tmp_path / "job.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert {plan["parallel"]["tp"] for plan in json.loads(result.stdout)["plans"]} == {1}


def test_a_llava_config_nests_its_text_model(tmp_path):
    """LLaVA's published config keeps the language model under text_config,
    leaving out what LlamaConfig defaults: it plans."""
    llava = json.loads((ROOT / "profiles" / "models" / "llava-1.5-7b.json").read_text())
    assert "text_config" in llava and "hidden_size" not in llava
    result = run(tmp_path, "--tp", "4", config=llava)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plans"][0]["parallel"]["tp"] == 4


# --- clusters and jobs --------------------------------------------------------------
@pytest.mark.parametrize("change, field", [
    ({"nodes": 2, "hosts": ["a", "a"]}, "hosts"),  # 16 ranks on 8 GPUs, then a crash at --out
    ({"nvlink_GBps": float("inf")}, "nvlink_GBps"),
    ({"nic_Gbps": float("nan")}, "nic_Gbps"),
    ({"nic_Gbps": 1e-300}, "nic_Gbps"),  # a unit mistake, not a link: it priced a step of 4.67e300 s
    ({"nvlink_GBps": 0.5}, "nvlink_GBps"),
    ({"nodes": 10**9}, "nodes"),
    ({"gpus_per_node": True}, "gpus_per_node"),
    # a node overridden twice: which of the two did the user mean?
    ({"nodes": 2, "node_overrides": [{"node": 1, "nic_Gbps": 100}, {"node": 1, "nic_Gbps": 300}]}, "node_overrides.1.node"),
    # an unknown field inside a list names the fields its entries take
    ({"nodes": 2, "node_overrides": [{"node": 1, "foo": 5}]}, "one of the fields node, gpu, nvlink_GBps"),
    # NCCL on the H100s and RCCL on the MI300Xs form no one communicator
    ({"nodes": 2, "node_overrides": [{"node": 1, "gpu": "MI300X"}]}, "node_overrides.0.gpu"),
])
def test_a_cluster_that_cannot_be(tmp_path, change, field):
    assert_bad(run(tmp_path, cluster={**CLUSTER, **change}), "cluster.yaml", field)


def test_integers_in_a_cluster_file_are_yaml_1_2_decimals(tmp_path):
    """PyYAML (YAML 1.1) reads 010 as octal 8 and 0x10, 1_6, 1:20 as
    integers: a node count of 010 planned 8 nodes. YAML 1.2 reads 010 as 10;
    the others are not integers there, so the field refuses them."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(JOB))
    text = yaml.safe_dump({**CLUSTER, "nodes": 2}).replace("nodes: 2", "nodes: {}")
    (tmp_path / "cluster.yaml").write_text(text.format("010"))
    plan = runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--json", "--global-batch-size", "80"])
    assert plan.exit_code == 0 and json.loads(plan.stdout)["gpus"] == 80, plan.output
    for written in ("0x10", "1_6", "1:20"):
        (tmp_path / "cluster.yaml").write_text(text.format(written))
        assert_bad(runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--json"]), "cluster.yaml", "nodes")
    for written in ("4_0.5", "6:40.5"):  # YAML 1.1 floats (405.0, 400.5), not 1.2's
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({**CLUSTER, "nic_Gbps": 1.0}).replace("nic_Gbps: 1.0", f"nic_Gbps: {written}"))
        assert_bad(runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--json"]), "cluster.yaml", "nic_Gbps")


def test_a_yaml_merge_key_reads_and_may_be_overridden(tmp_path):
    """``<<: *anchor`` brings an entry's fields in (it was refused: 'could not
    determine a constructor for the tag merge'), and the entry may give one again."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(JOB))
    base = yaml.safe_dump({**CLUSTER, "nodes": 2})
    (tmp_path / "cluster.yaml").write_text(base + "node_overrides:\n  - &slow {node: 0, nic_Gbps: 200}\n  - <<: *slow\n    node: 1\n")
    merged = runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--json"])
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({**CLUSTER, "nodes": 2, "nic_Gbps": 200}))
    plain = runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--json"])
    assert merged.exit_code == 0 and plain.exit_code == 0, merged.output
    steps = [json.loads(result.stdout)["plans"][0]["predicted"]["step_time_s"] for result in (merged, plain)]
    assert steps[0] == steps[1]


def test_exponents_in_a_cluster_file_are_numbers(tmp_path):
    """YAML 1.2 reads 4e2 as a number; PyYAML (YAML 1.1) as a string,
    which loom refused as 'a valid number'."""
    (tmp_path / "cluster.yaml").write_text("nodes: 1\ngpus_per_node: 8\ngpu: H100\nnvlink_GBps: 4.5e2\nnics_per_node: 8\nnic_Gbps: 4e2\n")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(CLUSTER))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(JOB))
    plans = [runner.invoke(app, ["evaluate", str(tmp_path / "job.yaml"), "--cluster", str(tmp_path / name), "--json"]) for name in ("cluster.yaml", "plain.yaml")]
    assert all(result.exit_code == 0 for result in plans), plans[0].output
    steps = [json.loads(result.stdout)["plans"][0]["predicted"]["step_time_s"] for result in plans]
    assert steps[0] == steps[1]


@pytest.mark.parametrize("host", ["", "a; rm -rf ~", "b c", "$(touch /tmp/pwned)", "`id`", "a'b", "-gpu", "gpu-", "a..b", ".a", "a_b",
                                  "node\nx", "g" * 64, ".".join(["g" * 63] * 4)])
def test_a_host_that_is_not_a_host_name_is_refused_naming_its_index(tmp_path, host):
    """Hosts go into #SBATCH --nodelist, train.sh and hostfile: RFC 1123
    names only (an empty one crashed building the report, exit 4; a ``;`` or
    ``$(...)`` went into the scripts)."""
    out = tmp_path / "out"
    result = run(tmp_path, "--out", str(out), cluster={**CLUSTER, "nodes": 2, "hosts": ["gpu-01.example.com", host]})
    assert_bad(result, "cluster.yaml", "hosts.1")
    assert not out.exists()


def test_valid_host_names_reach_the_launch_files_with_one_master_addr(tmp_path):
    hosts = ["gpu-01.Example.com", "9" * 63]
    out = tmp_path / "out"
    result = run(tmp_path, "--out", str(out), cluster={**CLUSTER, "nodes": 2, "hosts": hosts})
    assert result.exit_code == 0, result.output
    sbatch, train = (out / "slurm.sbatch").read_text(), (out / "train.sh").read_text()
    assert sorted(re.search(r"#SBATCH --nodelist=(\S+)", sbatch).group(1).split(",")) == sorted(hosts)
    # slurm.sbatch exports the address train.sh defaults to, quoted the same way.
    master = re.search(r'MASTER_ADDR="\$\{MASTER_ADDR:-([^}]*)\}"', train).group(1)
    assert master in hosts
    assert f'export MASTER_ADDR="${{MASTER_ADDR:-{master}}}"' in sbatch


@pytest.mark.parametrize("change, field", [
    ({"global_batch_size": True}, "global_batch_size"),  # a YAML true is not 1
    ({"global_batch_size": 10**12}, "global_batch_size"),
    ({"global_batch_size": 4194304}, "global_batch_size"),  # tokens typed as sequences, past the limit
    ({"search": {"tp": [True]}}, "search.tp"),
    ({"seq_length": 0}, "seq_length"),
])
def test_a_job_that_cannot_be(tmp_path, change, field):
    assert_bad(run(tmp_path, job={**JOB, **change}), "job.yaml", field)


def test_a_job_that_is_not_utf_8_is_bad_input(tmp_path):
    assert_bad(run(tmp_path, raw_job=yaml.safe_dump(JOB).encode() + "# noté\n".encode("latin-1")), "job.yaml", "UTF-8")


def test_an_odd_sequence_plans_without_context_parallelism(tmp_path):
    """Megatron runs seq 2047 with CP 1; only CP (2*cp chunks) and SP with TP
    need it to divide."""
    result = run(tmp_path, job={**JOB, "seq_length": 2047})
    assert result.exit_code == 0, result.output
    assert_bad(run(tmp_path, "--cp", "2", job={**JOB, "seq_length": 2047}), "--cp")
    assert_bad(run(tmp_path, "--tp", "4", "--sequence-parallel", job={**JOB, "seq_length": 2047}), "--tp")


def test_several_wrong_layout_flags_are_all_named(tmp_path):
    result = run(tmp_path, "--tp", "2", "--cp", "3", job={**JOB, "seq_length": 4100})  # 4100 % 6: neither CP nor SP splits it
    assert_bad(result, "--tp: expected tp x cp dividing", "--cp: expected 2*cp dividing", "2 problems")


def test_a_derived_dp_says_where_it_came_from(tmp_path):
    """--tp 3 on 8 GPUs without --dp: the batch problem names dp 2 as
    8 GPUs // (tp x pp x cp), not as a flag the user never gave."""
    result = run(tmp_path, "--tp", "3", "--mbs", "3")
    assert_bad(result, "--dp (not given: 8 GPUs // (tp x pp x cp) = 2)")


def test_search_knobs_name_only_the_real_problem(tmp_path):
    """An empty knob is bad input (nothing to search), and a bad value in a
    list is named alone, without the union's other branch ("auto")."""
    job = tmp_path / "job.yaml"
    job.write_text("model: llama-3-8b\ncluster: h100-64.yaml\nglobal_batch_size: 64\nseq_length: 4096\n"
                   "search: {recompute: [bogus], tp: []}\n")
    result = CliRunner().invoke(app, ["plan", str(job)])
    assert result.exit_code == 2
    assert "'search.tp': expected at least 1 item" in result.output and "'search.recompute.0'" in result.output
    assert "'auto'" not in result.output


def test_a_cluster_flag_that_names_no_file_is_blamed_on_the_flag(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: llama-3-8b\ncluster: h100-64.yaml\nglobal_batch_size: 64\nseq_length: 4096\n")
    result = CliRunner().invoke(app, ["plan", str(job), "--cluster", str(tmp_path)])
    assert result.exit_code == 2 and "--cluster:" in result.output and "job.yaml" not in result.output


@pytest.mark.parametrize("args, where", [(["plan", "job.yaml", "--top-k"], "loom plan --help"),
                                         (["profile", "gemm", "--tokens"], "loom profile gemm --help")])
def test_a_flag_missing_its_value_points_at_its_own_commands_help(args, where):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "requires an argument" in result.output and f"(see {where})" in result.output


def test_a_job_file_too_large_to_be_hand_written_is_refused_before_parsing(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: llama-3-8b\n# " + "x" * (5 * 2**20) + "\n")
    result = CliRunner().invoke(app, ["plan", str(job)])
    assert result.exit_code == 2 and "at most 4 MiB" in result.output


@pytest.mark.parametrize("framework, stack", [("deepspeed", "megatron-bridge"), ("megatron", "torchtitan"), ("torchtitan", "megatron-lm")])
def test_a_stack_of_another_framework_is_refused(tmp_path, framework, stack):
    """A stack's presets are what one framework's release runs: NVIDIA's
    Megatron-Bridge recipes (TE's fused loss, userbuffers) are not
    DeepSpeed's, torchtitan's are not Megatron's."""
    assert_bad(run(tmp_path, "--framework", framework, "--stack", stack), "--stack", stack)
    assert_bad(run(tmp_path, job={**JOB, "framework": framework, "stack": stack}), "stack", stack)


# --- paths and files a new user gets wrong ----------------------------------------------
def test_a_folder_or_missing_file_is_named_as_such(tmp_path):
    """A folder or a missing file given as the cluster or the model says
    which (not the catalogue's names); a model folder holding config.json is
    a Hugging Face checkout and reads."""
    (tmp_path / "empty").mkdir()
    for args, field, why in [(["--cluster", str(tmp_path / "empty")], "--cluster", "it is a folder"),
                             (["--cluster", str(tmp_path / "no.yaml")], "--cluster", "no such file"),
                             (["--model", str(tmp_path / "empty")], "--model", "has no config.json"),
                             (["--model", str(tmp_path / "no.json")], "--model", "no such file")]:
        result = runner.invoke(app, ["plan", *args])
        assert_bad(result, field, why)
        assert "llama-3-8b" not in result.stderr  # no catalogue listing
    checkout = tmp_path / "Llama-3.1-8B"
    checkout.mkdir()
    (checkout / "config.json").write_text((ROOT / "profiles" / "models" / "llama-3-8b.json").read_text())
    result = runner.invoke(app, ["plan", "--model", str(checkout), "--top-k", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "Llama-3.1-8B"


def test_a_missing_profile_is_blamed_on_its_field_or_flag(tmp_path):
    job = {**JOB, "profiles": ["gone.json"]}
    assert_bad(run(tmp_path, job=job), "job.yaml", "profiles.0", "no such file")
    assert_bad(runner.invoke(app, ["plan", "--profile", str(tmp_path / "gone.json")]), "command line", "--profile", "no such file")


def test_a_model_config_given_as_the_job_says_to_pass_it_as_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert_bad(runner.invoke(app, ["plan", str(tmp_path / "config.json")]), "model_type", "--model")


def test_without_a_job_file_the_bundled_examples_field_is_blamed_on_its_flag(tmp_path):
    """The user gave no job file: the refusal names --framework, not a path
    to the bundled example they never saw."""
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                                "original_max_position_embeddings": 1024}}))
    result = runner.invoke(app, ["plan", "--model", str(tmp_path / "config.json")])
    assert_bad(result, "command line", "--framework")
    assert "examples" not in result.stderr
