"""The bad-input matrix: every CLI command given bad run files, constitutions, prompt
files, exported datasets and model folders.

Each case builds its bad input under ``tmp_path`` and runs the real ``caikit`` command
in-process (a handful also through a real subprocess). Every case must give exit
status 2, exactly one ``error:`` line (a multi-problem error continues on indented
lines) naming the file and the key or line, no traceback, and leave every file that was
on disk before byte-for-byte unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import attrs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caikit_core import cli
from tests.shared import ECHO_RUN, PROMPTS, run_cli

pytestmark = pytest.mark.usefixtures("eval_plugin")

CONSTITUTION = Path(cli.__file__).parent / "data" / "constitution.toml"


@attrs.define
class Work:
    """A case's folder, the environment it sets and what it may ask for."""

    root: Path
    env: dict[str, str] = attrs.field(factory=dict)
    finished: Callable[[], Path] | None = None
    tiny: Callable[[], Path] | None = None
    clash: Callable[[], Path] = attrs.field(default=lambda: Path())
    syspath: list[Path] = attrs.field(factory=list)

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def prompts(self) -> Path:
        return self.write("prompts.txt", "\n".join(PROMPTS) + "\n")

    def run_file(self, *edits: tuple[str, str], extra: str = "", name: str = "run.toml") -> str:
        """The echo run file with ``(old, new)`` replacements and ``extra`` appended."""
        text = ECHO_RUN
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new)
        if not (self.root / "prompts.txt").exists():
            self.prompts()
        return str(self.write(name, text + extra))

    def run_dir(self) -> Path:
        """A copy of a finished echo run (its run file beside it)."""
        assert self.finished is not None
        target = self.root / "done"
        shutil.copytree(self.finished(), target)
        return target / "out"

    def model(self) -> Path:
        """A copy of the tiny Llama checkpoint, to break."""
        assert self.tiny is not None
        target = self.root / "model"
        shutil.copytree(self.tiny(), target)
        return target

    def hf_run(self, model: str) -> str:
        """A run file whose generator is the hf plugin on ``model`` (SL without SFT)."""
        return self.run_file(
            ('phases = ["sl", "rl"]', 'phases = ["sl"]'),
            ('policy = "echo-policy"', f'policy = "{model}"'),
            ('plugin = "echo"', 'plugin = "hf"\ndevice = "cpu"'),
            extra="\n[sl]\nsft = false\n",
        )


#: (id, the case: argv from its Work, the fragments the error block must hold)
Case = tuple[str, Callable[[Work], list[str]], tuple[str, ...]]
CASES: list[Case] = []


def case(*fragments: str) -> Callable[[Callable[[Work], list[str]]], Callable[[Work], list[str]]]:
    def add(fn: Callable[[Work], list[str]]) -> Callable[[Work], list[str]]:
        CASES.append((fn.__name__, fn, fragments))
        return fn

    return add


# --- run files: syntax ----------------------------------------------------------------


@case("run.toml", "invalid TOML", "line 1")
def toml_syntax_error(w: Work) -> list[str]:
    return ["config", "show", str(w.write("run.toml", 'output_dir = "out\n'))]


@case("run.yaml", "invalid YAML", "line 3")
def yaml_syntax_error(w: Work) -> list[str]:
    return ["config", "show", str(w.write("run.yaml", "output_dir: out\nmodels: [policy\n"))]


@case("run.yaml", "(top level): expected a table")
def yaml_top_level_list(w: Work) -> list[str]:
    return ["config", "show", str(w.write("run.yaml", "- a\n- b\n"))]


@case("run.json", "unknown run file type '.json'")
def json_run_file(w: Work) -> list[str]:
    return ["config", "show", str(w.write("run.json", json.dumps({"output_dir": "out"})))]


@case("run.toml", "file not found")
def run_file_missing(w: Work) -> list[str]:
    return ["run", str(w.root / "run.toml")]


@case("run.toml", "cannot read file")
def run_file_not_utf8(w: Work) -> list[str]:
    return ["config", "show", str(w.write("run.toml", b'output_dir = "\xff"\n'))]


@case("run.toml", "invalid TOML")
def toml_duplicate_key(w: Work) -> list[str]:
    return ["run", w.run_file(extra='seed = 4\n[models]\npolicy = "x"\n')]


# --- run files: keys and values -------------------------------------------------------


@case("run.toml", "bogus", "unknown key")
def unknown_top_level_key(w: Work) -> list[str]:
    return ["config", "show", w.run_file(("seed = 3", "seed = 3\nbogus = 1"))]


@case("run.toml", "seed", "expected an integer")
def wrong_type_seed(w: Work) -> list[str]:
    return ["run", w.run_file(("seed = 3", 'seed = "three"'))]


@case("run.toml", "shard_size")
def shard_size_zero(w: Work) -> list[str]:
    return ["run", w.run_file(("shard_size = 4", "shard_size = 0"))]


@case("run.toml", "phases")
def unknown_phase(w: Work) -> list[str]:
    return ["config", "show", w.run_file(('phases = ["sl", "rl"]', 'phases = ["sl", "xl"]'))]


@case("run.toml", "phases", "at least one")
def no_phases(w: Work) -> list[str]:
    return ["config", "show", w.run_file(('phases = ["sl", "rl"]', "phases = []"))]


@case("run.toml", "models")
def models_missing(w: Work) -> list[str]:
    return ["run", w.run_file(('[models]\npolicy = "echo-policy"\n', ""))]


@case("run.toml", "data.format")
def data_format_unknown(w: Work) -> list[str]:
    return [
        "run",
        w.run_file(('prompts = "prompts.txt"', 'prompts = "prompts.txt"\nformat = "csv"')),
    ]


@case("run.toml", "data.limit")
def data_limit_negative(w: Work) -> list[str]:
    return ["run", w.run_file(('prompts = "prompts.txt"', 'prompts = "prompts.txt"\nlimit = -1'))]


@case("run.toml", "output_dir")
def output_dir_empty(w: Work) -> list[str]:
    return ["run", w.run_file(('output_dir = "out"', 'output_dir = ""'))]


@case("run.toml", "sl.sampling.temperature")
def negative_temperature(w: Work) -> list[str]:
    return ["run", w.run_file(extra="\n[sl.sampling]\ntemperature = -1.0\n")]


@case("run.toml", "rl.sampling.top_p")
def top_p_above_one(w: Work) -> list[str]:
    return ["run", w.run_file(extra="\n[rl.sampling]\ntop_p = 1.5\n")]


@case("run.toml", "generator.delay", "NaN")
def nan_in_plugin_table(w: Work) -> list[str]:
    return ["run", w.run_file(('plugin = "echo"', 'plugin = "echo"\ndelay = nan'))]


# --- run files: plugins ---------------------------------------------------------------


@case("run.toml", "generator.plugin", "unknown generator plugin 'echoo'", "did you mean 'echo'")
def unknown_generator_plugin(w: Work) -> list[str]:
    return ["run", w.run_file(('plugin = "echo"', 'plugin = "echoo"'))]


@case("run.toml", "critic.plugin", "unknown critic plugin")
def unknown_critic_plugin(w: Work) -> list[str]:
    return ["config", "show", w.run_file(('plugin = "shout"', 'plugin = "nobody"'))]


@case("run.toml", "generator.delay", "expected a number")
def bad_value_in_plugin_table(w: Work) -> list[str]:
    return ["run", w.run_file(('plugin = "echo"', 'plugin = "echo"\ndelay = "slow"'))]


@case("run.toml", "generator.delay", "generator.prefix", "2 config problems")
def two_bad_values_in_one_plugin_table(w: Work) -> list[str]:
    return ["run", w.run_file(('plugin = "echo"', 'plugin = "echo"\ndelay = "slow"\nprefix = 3'))]


@case("run.toml", "generator.max_batch_size", "generator.max_context", "2 config problems")
def two_out_of_range_values_in_one_plugin_table(w: Work) -> list[str]:
    run = w.hf_run("./model")
    text = Path(run).read_text().replace('device = "cpu"', "max_batch_size = 0\nmax_context = 0")
    Path(run).write_text(text)
    return ["config", "show", run]


@case("run.toml", "critic.bogus", "unknown key")
def unknown_key_in_plugin_table(w: Work) -> list[str]:
    return ["run", w.run_file(("revisions = 2", "revisions = 2\nbogus = true"))]


@case("run.toml", "generator", "expected a table with a 'plugin' key")
def role_not_a_table(w: Work) -> list[str]:
    edits = (('[generator]\nplugin = "echo"\n', ""), ("seed = 3", "seed = 3\ngenerator = 3"))
    return ["run", w.run_file(*edits)]


@case("run.toml", "generator", "'plugin' key")
def role_table_without_plugin(w: Work) -> list[str]:
    return ["run", w.run_file(('[generator]\nplugin = "echo"', '[generator]\nprefix = "a"'))]


@case("run.toml", "labeller", "required by phase 'rl'")
def role_missing(w: Work) -> list[str]:
    return ["run", w.run_file(('[labeller]\nplugin = "length"\n', ""))]


@case("run.toml", "generator.plugin", "CAIKIT_LOAD_PLUGINS")
def plugins_limited_by_variable(w: Work) -> list[str]:
    w.env["CAIKIT_LOAD_PLUGINS"] = "caikit_local"
    return ["config", "show", w.run_file()]


@case("run.toml", "eval.instruments", "unknown instrument plugin")
def unknown_instrument(w: Work) -> list[str]:
    return ["config", "show", w.run_file(extra='\n[eval]\ninstruments = ["nosuch"]\n')]


# --- run files: files they name -------------------------------------------------------


@case("run.toml", "data.prompts", "no such prompt file", "nowhere.txt")
def prompt_file_missing(w: Work) -> list[str]:
    return ["run", w.run_file(('prompts = "prompts.txt"', 'prompts = "nowhere.txt"'))]


@case("run.toml", "data.prompts", "is a folder")
def prompt_file_is_a_folder(w: Work) -> list[str]:
    (w.root / "folder").mkdir()
    return ["run", w.run_file(('prompts = "prompts.txt"', 'prompts = "folder"'))]


@case("run.toml", "sl.helpfulness_prompts", "no such prompt file", "helpful.txt")
def helpfulness_file_missing(w: Work) -> list[str]:
    return ["run", w.run_file(extra='\n[sl]\nhelpfulness_prompts = "helpful.txt"\n')]


@case("run.toml", "constitution.path", "no such file", "nowhere.toml")
def constitution_missing(w: Work) -> list[str]:
    return ["run", w.run_file(extra='\n[constitution]\npath = "nowhere.toml"\n')]


@case("run.toml", "constitution.path", "no critique_revision principles", "critic ('shout')")
def constitution_without_critique_principles(w: Work) -> list[str]:
    w.write("c.toml", '[[feedback]]\nid = "f1"\ntext = "Which is kinder?"\n')
    return ["run", w.run_file(extra='\n[constitution]\npath = "c.toml"\n')]


@case("run.toml", "constitution.format")
def constitution_format_unknown(w: Work) -> list[str]:
    return ["run", w.run_file(extra='\n[constitution]\nformat = "antropic"\n')]


@case("run.toml", "constitution.path", "c.toml", "format 'anthropic' is read from JSON")
def constitution_toml_read_as_anthropic(w: Work) -> list[str]:
    shutil.copy(CONSTITUTION, w.root / "c.toml")
    return ["run", w.run_file(extra='\n[constitution]\npath = "c.toml"\nformat = "anthropic"\n')]


# --- run files: the output folder -----------------------------------------------------


@case("run.toml", "output_dir", "afile", "it is a file, not a folder")
def output_dir_is_a_file(w: Work) -> list[str]:
    w.write("afile", "keep me\n")
    return ["run", w.run_file(('output_dir = "out"', 'output_dir = "afile"'))]


@case("run.toml", "output_dir", "afile/out", "Not a directory")
def output_dir_below_a_file(w: Work) -> list[str]:
    w.write("afile", "keep me\n")
    return ["run", w.run_file(('output_dir = "out"', 'output_dir = "afile/out"'))]


@case("run.toml", "output_dir", "/proc/caikit-out")
def output_dir_under_proc(w: Work) -> list[str]:
    return ["run", w.run_file(('output_dir = "out"', 'output_dir = "/proc/caikit-out"'))]


@case("run.toml", "output_dir", "File name too long")
def output_dir_name_too_long(w: Work) -> list[str]:
    return ["run", w.run_file(('output_dir = "out"', f'output_dir = "{"o" * 300}"'))]


@case("other.toml", "holds the run of", "--new-run")
def output_dir_of_another_run_file(w: Work) -> list[str]:
    run_dir = w.run_dir()
    other = w.write("done/other.toml", (run_dir.parent / "run.toml").read_text())
    return ["run", str(other)]


# --- run / resume ---------------------------------------------------------------------


@case("give a run file or --resume RUN_DIR, not both")
def run_with_file_and_resume(w: Work) -> list[str]:
    return ["run", w.run_file(), "--resume", str(w.root)]


@case("give a run file, or --resume RUN_DIR")
def run_without_file(w: Work) -> list[str]:
    return ["run"]


@case("nothing-here", "not a caikit run directory (no run.json)")
def resume_not_a_run_dir(w: Work) -> list[str]:
    (w.root / "nothing-here").mkdir()
    return ["run", "--resume", str(w.root / "nothing-here")]


@case("run.json", "unreadable")
def resume_corrupt_run_json(w: Work) -> list[str]:
    w.write("broken/run.json", '{"config": ')
    return ["run", "--resume", str(w.root / "broken")]


@case("run.json", "has no recorded run file")
def resume_run_json_without_config(w: Work) -> list[str]:
    w.write("broken/run.json", '{"stages": {}}')
    return ["run", "--resume", str(w.root / "broken")]


# --- prompt files ---------------------------------------------------------------------


def _with_prompts(w: Work, name: str, content: str | bytes, extra: str = "") -> list[str]:
    w.write(name, content)
    return ["run", w.run_file(('prompts = "prompts.txt"', f'prompts = "{name}"{extra}'))]


@case("p.jsonl:2", "invalid JSON")
def jsonl_invalid_line(w: Work) -> list[str]:
    return _with_prompts(w, "p.jsonl", '{"prompt": "a"}\n{"prompt": \n')


@case("p.jsonl:1", "expected a JSON object")
def jsonl_row_not_an_object(w: Work) -> list[str]:
    return _with_prompts(w, "p.jsonl", "[1, 2]\n")


@case("p.jsonl:1", "no 'prompt' or 'messages' field")
def jsonl_missing_field(w: Work) -> list[str]:
    return _with_prompts(w, "p.jsonl", '{"question": "a"}\n')


@case("p.jsonl:1", "'prompt' must be a string")
def jsonl_field_wrong_type(w: Work) -> list[str]:
    return _with_prompts(w, "p.jsonl", '{"prompt": 3}\n')


@case("p.jsonl:1", "'messages' must be a list")
def jsonl_bad_messages(w: Work) -> list[str]:
    return _with_prompts(w, "p.jsonl", '{"messages": [{"role": "user"}]}\n')


@case("p.jsonl:2", "not UTF-8", "0xe9 at column 13")
def jsonl_not_utf8(w: Work) -> list[str]:
    return _with_prompts(w, "p.jsonl", b'{"prompt": "a"}\n{"prompt": "\xe9t\xe9"}\n')


@case("p.txt:3", "not UTF-8", "0xff")
def text_not_utf8(w: Work) -> list[str]:
    return _with_prompts(w, "p.txt", b"one\ntwo\n\xff\xfe three\n")


@case("p.txt.gz", "the gzip stream is truncated")
def text_gzip_truncated(w: Work) -> list[str]:
    data = gzip.compress(("\n".join(PROMPTS) + "\n").encode())
    return _with_prompts(w, "p.txt.gz", data[: len(data) // 2])


@case("p.jsonl.gz", "cannot read", "Not a gzipped file")
def jsonl_gz_not_gzip(w: Work) -> list[str]:
    return _with_prompts(w, "p.jsonl.gz", '{"prompt": "a"}\n')


@case("p.txt", "no prompts to run")
def text_empty(w: Work) -> list[str]:
    return _with_prompts(w, "p.txt", "# only a comment\n\n")


@case("p.parquet", "cannot read Parquet")
def parquet_corrupt(w: Work) -> list[str]:
    return _with_prompts(w, "p.parquet", b"PAR1 this is not parquet")


@case("p.parquet", "row 0", "no 'prompt' or 'messages' field")
def parquet_missing_column(w: Work) -> list[str]:
    pq.write_table(pa.table({"question": ["a", "b"]}), w.root / "p.parquet")
    return ["run", w.run_file(('prompts = "prompts.txt"', 'prompts = "p.parquet"'))]


@case("p.csv", "cannot tell the prompt format", "data.format")
def prompt_suffix_unknown(w: Work) -> list[str]:
    return _with_prompts(w, "p.csv", "prompt\na\n")


@case("p.jsonl:1", "transcript has no Human turn")
def hh_rlhf_without_human_turn(w: Work) -> list[str]:
    row = json.dumps({"chosen": "no turns here", "rejected": "x"})
    return _with_prompts(w, "p.jsonl", row + "\n", '\nformat = "hh-rlhf"')


# --- constitutions --------------------------------------------------------------------


@case("c.toml", "invalid TOML")
def caikit_constitution_toml_syntax(w: Work) -> list[str]:
    return ["constitution", "show", str(w.write("c.toml", "[[critique_revision]\n"))]


@case("c.yaml", "bogus")
def caikit_constitution_unknown_key(w: Work) -> list[str]:
    return ["constitution", "show", str(w.write("c.yaml", "name: x\nbogus: 1\n"))]


@case("c.toml", "critique_revision[1]", "h1")
def caikit_constitution_duplicate_ids(w: Work) -> list[str]:
    entry = '[[critique_revision]]\nid = "h1"\ncritique = "Is it harmful?"\nrevision = "Fix it."\n'
    return ["constitution", "show", str(w.write("c.toml", entry + entry))]


@case("c.toml", "no critique/revision or feedback principles")
def caikit_constitution_empty(w: Work) -> list[str]:
    return ["constitution", "show", str(w.write("c.toml", 'name = "empty"\n'))]


@case("c.toml", "format 'anthropic' is read from JSON")
def anthropic_format_on_toml(w: Work) -> list[str]:
    shutil.copy(CONSTITUTION, w.root / "c.toml")
    return ["constitution", "show", str(w.root / "c.toml"), "--format", "anthropic"]


@case("anthropic", "holds none of Anthropic's prompt files")
def anthropic_empty_folder(w: Work) -> list[str]:
    (w.root / "anthropic").mkdir()
    return ["constitution", "show", str(w.root / "anthropic"), "--format", "anthropic"]


@case("CritiqueRevisionInstructions.json", "invalid JSON at line 1")
def anthropic_invalid_json(w: Work) -> list[str]:
    w.write("anthropic/CritiqueRevisionInstructions.json", "{")
    return ["constitution", "show", str(w.root / "anthropic")]


@case("swarm.json", "invalid JSON")
def llm_swarm_invalid_json(w: Work) -> list[str]:
    w.write("swarm.json", '{"constitutions": [')
    return ["constitution", "show", str(w.root / "swarm.json"), "--format", "llm-swarm"]


@case("swarm.json", "constitutions")
def llm_swarm_wrong_shape(w: Work) -> list[str]:
    w.write("swarm.json", '{"constitutions": 3}')
    return ["constitution", "show", str(w.root / "swarm.json")]


@case("c.json", "cannot tell the constitution format")
def constitution_json_unknown_shape(w: Work) -> list[str]:
    return ["constitution", "show", str(w.write("c.json", "[1, 2]"))]


@case("nowhere.toml", "no such file or directory")
def constitution_show_missing(w: Work) -> list[str]:
    return ["constitution", "show", str(w.root / "nowhere.toml")]


@case("nowhere.toml", "no such file or directory")
def convert_source_missing(w: Work) -> list[str]:
    return ["constitution", "convert", str(w.root / "nowhere.toml"), str(w.root / "x.yaml")]


@case("afile", "out.toml")
def convert_into_a_file(w: Work) -> list[str]:
    w.write("afile", "keep me\n")
    return ["constitution", "convert", str(CONSTITUTION), str(w.root / "afile" / "out.toml")]


@case("out.txt", "cannot tell the format to write")
def convert_unknown_target_suffix(w: Work) -> list[str]:
    return ["constitution", "convert", str(CONSTITUTION), str(w.root / "out.txt")]


@case("out.json", "cannot hold", "--lossy")
def convert_lossy_refused(w: Work) -> list[str]:
    return ["constitution", "convert", str(CONSTITUTION), str(w.root / "out.json")]


# --- exported datasets ----------------------------------------------------------------


@case("nothing-here", "not a caikit run directory")
def export_not_a_run_dir(w: Work) -> list[str]:
    (w.root / "nothing-here").mkdir()
    return ["export", str(w.root / "nothing-here"), "--out", str(w.root / "x")]


@case("afile", "cai.parquet")
def export_into_a_file(w: Work) -> list[str]:
    run_dir = w.run_dir()
    w.write("afile", "keep me\n")
    return ["export", str(run_dir), "--out", str(w.root / "afile" / "cai")]


@case("/proc/caikit-export", "cai.jsonl")
def export_to_proc(w: Work) -> list[str]:
    run_dir = w.run_dir()
    return ["export", str(run_dir), "--out", "/proc/caikit-export/cai", "--format", "jsonl"]


@case("revisions")
def export_without_revisions(w: Work) -> list[str]:
    run_dir = w.run_dir()
    for shard in (run_dir / "stages" / "revisions").rglob("*.parquet"):
        shard.unlink()
    return ["export", str(run_dir), "--out", str(w.root / "cai")]


@case("run.json", "unreadable")
def export_corrupt_run_json(w: Work) -> list[str]:
    run_dir = w.run_dir()
    (run_dir / "run.json").write_text("{", encoding="utf-8")
    return ["export", str(run_dir), "--out", str(w.root / "cai")]


# --- report, eval, check, models, plugins ---------------------------------------------


@case("nothing-here")
def report_not_a_run_dir(w: Work) -> list[str]:
    (w.root / "nothing-here").mkdir()
    return ["report", str(w.root / "nothing-here")]


@case("afile")
def report_into_a_file(w: Work) -> list[str]:
    run_dir = w.run_dir()
    w.write("afile", "keep me\n")
    return ["report", str(run_dir), "--out", str(w.root / "afile" / "r.html")]


@case("nosuch", "unknown instrument plugin")
def eval_unknown_instrument(w: Work) -> list[str]:
    return ["eval", "nosuch", "--config", w.run_file()]


@case("--config", "--run")
def eval_without_run(w: Work) -> list[str]:
    return ["eval", "refusal"]


@case("--set", "KEY=VALUE")
def eval_set_without_equals(w: Work) -> list[str]:
    return ["eval", "refusal", "--config", w.run_file(), "--set", "novalue"]


@case("run.toml", "invalid TOML")
def eval_bad_run_file(w: Work) -> list[str]:
    return ["eval", "refusal", "--config", str(w.write("run.toml", "[models\n"))]


@case("unknown role 'critter'")
def check_unknown_role(w: Work) -> list[str]:
    return ["check", "critter", "echo"]


@case("generator 'echo'", "bogus", "unknown key")
def check_config_unknown_key(w: Work) -> list[str]:
    return ["check", "generator", "echo", "--config", '{"bogus": 1}']


@case("--config is not valid JSON")
def check_config_not_json(w: Work) -> list[str]:
    return ["check", "generator", "echo", "--config", "{bogus"]


@case("--config must be a JSON object")
def check_config_not_an_object(w: Work) -> list[str]:
    return ["check", "generator", "echo", "--config", "[1]"]


@case("unknown generator plugin 'nosuch'")
def check_unknown_plugin(w: Work) -> list[str]:
    return ["check", "generator", "nosuch"]


@case("no-such-alias")
def models_fetch_unknown_alias(w: Work) -> list[str]:
    w.env["CAIKIT_CACHE"] = str(w.root / "cache")
    return ["models", "fetch", "no-such-alias"]


@case("smollm2-135m-instruct", "fetch")
def models_path_not_fetched(w: Work) -> list[str]:
    w.env["CAIKIT_CACHE"] = str(w.root / "cache")
    return ["models", "path", "smollm2-135m-instruct"]


@case("two plugins register the generator name 'echo'")
def plugins_list_with_clashing_plugins(w: Work) -> list[str]:
    w.syspath.append(w.clash())
    return ["plugins", "--all"]


# --- model folders --------------------------------------------------------------------


@case("models.policy: no such model folder", "nosuch-model")
def model_folder_missing(w: Work) -> list[str]:
    return ["run", w.hf_run("./nosuch-model")]


@case("models.policy: no such model folder", "models/smolm2", "closest folder there is")
def model_folder_misspelt_under_an_existing_folder(w: Work) -> list[str]:
    (w.root / "models" / "smollm2").mkdir(parents=True)
    return ["run", w.hf_run("models/smolm2")]


@case("models.policy: no such model folder", "my model--v2")
def model_name_that_cannot_be_a_hub_id(w: Work) -> list[str]:
    return ["run", w.hf_run("my model--v2")]


@case("hf generator", "model folder does not exist", "HF_HUB_OFFLINE")
def model_hub_id_offline_not_cached(w: Work) -> list[str]:
    w.env["HF_HUB_OFFLINE"] = "1"
    w.env["HF_HUB_CACHE"] = str(w.root / "hub")
    return ["run", w.hf_run("HuggingFaceTB/SmolLM2-135M-Instruckt")]


@case("hf generator", "no tokenizer in")
def model_folder_without_tokenizer(w: Work) -> list[str]:
    (w.root / "empty-model").mkdir()
    return ["run", w.hf_run(str(w.root / "empty-model"))]


@case("hf generator", "cannot load", "model")
def model_config_json_corrupt(w: Work) -> list[str]:
    folder = w.model()
    (folder / "config.json").write_text("{ not json", encoding="utf-8")
    return ["run", w.hf_run(str(folder))]


@case("hf generator", "cannot load a model from", "model")
def model_safetensors_corrupt(w: Work) -> list[str]:
    folder = w.model()
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    return ["run", w.hf_run(str(folder))]


@case("hf generator", "model")
def model_pickle_only(w: Work) -> list[str]:
    import torch

    folder = w.model()
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    return ["run", w.hf_run(str(folder))]


@case("hf generator", "max_new_tokens=4096", "context")
def max_new_tokens_fills_the_context(w: Work) -> list[str]:
    path = w.hf_run(str(w.model()))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("[sl.sampling]\nmax_new_tokens = 4096\n")
    return ["run", path]


# --- the harness ----------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """The sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def error_block(err: str) -> list[str]:
    """The ``error:`` line and the indented lines after it; exactly one such line."""
    lines = err.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, err
    block = lines[starts[0] :]
    assert all(line.startswith("  ") for line in block[1:]), err
    return block


@pytest.fixture(scope="module")
def finished_run(echo_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished echo run (run file, prompts, ``out/``), made by a real ``caikit run``."""
    root = tmp_path_factory.mktemp("finished")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (root / "run.toml").write_text(ECHO_RUN, encoding="utf-8")
    done = run_cli("run", "-q", str(root / "run.toml"), pythonpath=_pythonpath(echo_site))
    assert done.returncode == 0, done.stderr
    return root


def _pythonpath(echo_site: Path) -> list[Path]:
    import tests.shared

    root = Path(tests.shared.__file__).resolve().parents[1]
    return [echo_site, root, root / "plugins"]


@pytest.mark.parametrize(("make", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_message(
    make: Callable[[Work], list[str]],
    fragments: tuple[str, ...],
    tmp_path: Path,
    with_echo: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    work = Work(
        tmp_path,
        finished=lambda: request.getfixturevalue("finished_run"),
        tiny=lambda: request.getfixturevalue("tiny_llama"),
        clash=lambda: request.getfixturevalue("clash_site"),
    )
    argv = make(work)
    for key, value in work.env.items():
        monkeypatch.setenv(key, value)
    for folder in work.syspath:
        monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = cli.main(["-q", *argv])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in out + err
    message = "\n".join(error_block(err))
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before


def test_the_matrix_has_at_least_60_cases() -> None:
    assert len(CASES) >= 60


SUBPROCESS_CASES = [
    "output_dir_is_a_file",
    "text_not_utf8",
    "check_config_unknown_key",
    "convert_into_a_file",
    "export_into_a_file",
    "model_folder_missing",
]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(
    name: str, tmp_path: Path, echo_site: Path, request: pytest.FixtureRequest
) -> None:
    """The same cases through a real ``caikit`` process: status 2, one line, no
    traceback, and nothing on disk changed."""
    (make, fragments) = next((c[1], c[2]) for c in CASES if c[0] == name)
    work = Work(
        tmp_path,
        finished=lambda: request.getfixturevalue("finished_run"),
        tiny=lambda: request.getfixturevalue("tiny_llama"),
    )
    argv = make(work)
    before = snapshot(tmp_path)
    done = run_cli("-q", *argv, env_extra=work.env, cwd=tmp_path, pythonpath=_pythonpath(echo_site))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    message = "\n".join(error_block(done.stderr))
    for fragment in fragments:
        assert fragment in message
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


def test_debug_shows_the_traceback(tmp_path: Path, echo_site: Path) -> None:
    """``--debug`` adds the traceback above the same one-line message."""
    work = Work(tmp_path)
    argv = output_dir_is_a_file(work)
    done = run_cli("--debug", *argv, cwd=tmp_path, pythonpath=_pythonpath(echo_site))
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert "FileExistsError" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("corrupt", ["config.json", "model.safetensors"])
def test_a_corrupt_preference_model_folder_is_one_plugin_error(
    corrupt: str, tiny_llama: Path, tmp_path: Path
) -> None:
    """A preference-model folder with a corrupt config or corrupt weights is a
    PluginError naming the folder (safetensors' own error type used to escape)."""
    from caikit_core.errors import PluginError
    from caikit_core.plugins import get_registry

    folder = tmp_path / "pm"
    shutil.copytree(tiny_llama, folder)
    (folder / corrupt).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    spec = get_registry().get("preference_model", "torch")
    assert spec.config_cls is not None
    model = spec.build(spec.config_cls(device="cpu"), model=str(folder))
    with pytest.raises(PluginError, match=rf"^torch preference model: cannot load .*{folder}"):
        model.load(folder)
