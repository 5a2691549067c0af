from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from tei_manager.config import (
    ENV_OVERRIDES,
    ConfigError,
    GrpcConfig,
    InstanceConfig,
    ManagerConfig,
    OtelConfig,
    SeedInstance,
    decode_instance_config,
    default_state_dir,
    load_config,
    parse_config,
    parse_instance_config,
    validate_instance_config,
    validate_model_id,
    validate_name,
    validate_port,
)
from tei_manager.errors import ErrorCode, ValidationError
from tei_manager.grpc.limits import Limits

ENV = {"HOME": "/home/u"}


def parse(text: str, **env: str) -> ManagerConfig:
    return parse_config(text, env={**ENV, **env})


def config_error(text: str, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, **env)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.code is ErrorCode.INVALID_CONFIG
    return message


# --- defaults and file decoding ----------------------------------------------


def test_defaults() -> None:
    c = parse("")
    assert c.api_host == "0.0.0.0"
    assert (c.api_port, c.grpc_port, c.grpc_enabled) == (9000, 9001, True)
    assert c.state_file == "/home/u/.local/state/tei-manager/state.toml"
    assert c.log_dir == "/home/u/.local/state/tei-manager/logs"
    assert c.health_check_interval_secs == 10
    assert c.health_check_initial_delay_secs == 0
    assert c.startup_timeout_secs == 300
    assert c.max_failures_before_restart == 3
    assert c.ready_requires_instances is False  # the contract's readiness
    assert c.graceful_shutdown_timeout_secs == 30
    assert c.auto_restore_on_restart is True
    assert c.max_instances is None
    assert (c.instance_port_start, c.instance_port_end) == (8080, 8180)
    assert c.instances == () and c.models == ()
    assert c.tei_binary_path is None
    assert c.grpc_max_message_size_mb == 40
    assert c.grpc_max_parallel_streams == 100
    assert c.grpc == GrpcConfig()
    assert c.grpc.limits(max_concurrent_streams=100) == Limits()
    assert c.grpc_request_timeout_secs == 30
    assert (c.restart_backoff_initial_secs, c.restart_backoff_max_secs) == (1, 300)
    assert (c.crash_loop_restarts, c.crash_loop_window_secs) == (0, 300)


def test_struct_defaults_equal_parsed_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg")
    assert ManagerConfig() == parse_config("", env={"XDG_STATE_HOME": "/xdg"})


def test_xdg_state_home() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/xdg", "HOME": "/h"}) == "/xdg/tei-manager"
    # The XDG spec says to ignore a relative value.
    assert default_state_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == (
        "/h/.local/state/tei-manager"
    )
    c = parse("", XDG_STATE_HOME="/xdg")
    assert (c.state_file, c.log_dir) == ("/xdg/tei-manager/state.toml", "/xdg/tei-manager/logs")


FULL = """
api_host = "127.0.0.1"
api_port = 19000
grpc_port = 19001
grpc_enabled = false
state_file = "/data/state.toml"
log_dir = "/data/logs"
health_check_interval_secs = 30
health_check_initial_delay_secs = 60
startup_timeout_secs = 120.5
max_failures_before_restart = 0
graceful_shutdown_timeout_secs = 5
auto_restore_on_restart = false
max_instances = 10
instance_port_start = 8080
instance_port_end = 8110
models = ["BAAI/bge-small-en-v1.5", "sentence-transformers/all-MiniLM-L6-v2"]
tei_binary_path = "/usr/local/bin/text-embeddings-router"
grpc_max_message_size_mb = 64
grpc_max_parallel_streams = 256
grpc_request_timeout_secs = 10
restart_backoff_initial_secs = 2
restart_backoff_max_secs = 120
crash_loop_restarts = 5
crash_loop_window_secs = 600

[[instances]]
name = "bge-small"
model_id = "BAAI/bge-small-en-v1.5"
auto_start = true

[[instances]]
name = "splade"
model_id = "/models/splade"
port = 8200
prometheus_port = 0
gpu_id = 1
pooling = "splade"
max_batch_tokens = 8192
max_concurrent_requests = 64
startup_timeout_secs = 600
extra_args = ["--dtype", "float16"]
revision = "main"
auto_start = false
"""


def test_every_option_decodes() -> None:
    c = parse(FULL)
    assert c.api_host == "127.0.0.1"
    assert (c.api_port, c.grpc_port, c.grpc_enabled) == (19000, 19001, False)
    assert (c.state_file, c.log_dir) == ("/data/state.toml", "/data/logs")
    assert c.health_check_interval_secs == 30.0
    assert c.health_check_initial_delay_secs == 60.0
    assert c.startup_timeout_secs == 120.5
    assert c.max_failures_before_restart == 0
    assert c.graceful_shutdown_timeout_secs == 5.0
    assert c.auto_restore_on_restart is False
    assert c.max_instances == 10
    assert (c.instance_port_start, c.instance_port_end) == (8080, 8110)
    assert c.models == ("BAAI/bge-small-en-v1.5", "sentence-transformers/all-MiniLM-L6-v2")
    assert c.tei_binary_path == "/usr/local/bin/text-embeddings-router"
    assert (c.grpc_max_message_size_mb, c.grpc_max_parallel_streams) == (64, 256)
    assert c.grpc_request_timeout_secs == 10.0
    assert (c.restart_backoff_initial_secs, c.restart_backoff_max_secs) == (2, 120)
    assert (c.crash_loop_restarts, c.crash_loop_window_secs) == (5, 600)
    bge, splade = c.instances
    assert bge == SeedInstance(name="bge-small", model_id="BAAI/bge-small-en-v1.5")
    assert bge.auto_start is True and bge.port is None
    assert splade == SeedInstance(
        name="splade",
        model_id="/models/splade",
        port=8200,
        prometheus_port=0,
        gpu_id=1,
        pooling="splade",
        max_batch_tokens=8192,
        max_concurrent_requests=64,
        startup_timeout_secs=600.0,
        extra_args=("--dtype", "float16"),
        revision="main",
        auto_start=False,
    )


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        parse("").api_port = 1  # type: ignore[misc]


def test_manager_ports() -> None:
    assert parse("").manager_ports() == {9000, 9001}
    assert parse("grpc_enabled = false").manager_ports() == {9000}
    assert parse("api_port = 0\ngrpc_port = 0").manager_ports() == frozenset()


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("api_port = 9100\n")
    assert load_config(path, env=ENV).api_port == 9100
    assert load_config(None, env=ENV).api_port == 9000


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(tmp_path / "nope.toml", env=ENV)


# --- environment overrides ---------------------------------------------------


@pytest.mark.parametrize(
    ("var", "text", "field", "value"),
    [
        ("TEI_MANAGER_API_PORT", "9100", "api_port", 9100),
        ("TEI_MANAGER_GRPC_PORT", " 9101 ", "grpc_port", 9101),
        ("TEI_MANAGER_STATE_FILE", "/data/state.toml", "state_file", "/data/state.toml"),
        ("TEI_MANAGER_HEALTH_CHECK_INTERVAL", "2.5", "health_check_interval_secs", 2.5),
        ("TEI_BINARY_PATH", "/bin/tei", "tei_binary_path", "/bin/tei"),
        ("TEI_MANAGER_GRPC_ENABLED", "false", "grpc_enabled", False),
        ("TEI_MANAGER_GRPC_ENABLED", "0", "grpc_enabled", False),
        ("TEI_MANAGER_GRPC_ENABLED", "Yes", "grpc_enabled", True),
        ("TEI_MANAGER_LOG_DIR", "/data/logs", "log_dir", "/data/logs"),
        ("TEI_MANAGER_API_KEEP_ALIVE_TIMEOUT", "2.5", "api_keep_alive_timeout_secs", 2.5),
        ("TEI_MANAGER_API_MAX_CONNECTIONS", "64", "api_max_connections", 64),
        ("TEI_MANAGER_RESTART_BACKOFF_INITIAL", "0.5", "restart_backoff_initial_secs", 0.5),
        ("TEI_MANAGER_RESTART_BACKOFF_MAX", "60", "restart_backoff_max_secs", 60.0),
        ("TEI_MANAGER_CRASH_LOOP_RESTARTS", "5", "crash_loop_restarts", 5),
        ("TEI_MANAGER_CRASH_LOOP_WINDOW", "600", "crash_loop_window_secs", 600.0),
        ("TEI_MANAGER_READY_REQUIRES_INSTANCES", "true", "ready_requires_instances", True),
        ("TEI_MANAGER_READY_REQUIRES_INSTANCES", "off", "ready_requires_instances", False),
    ],
)
def test_env_override(var: str, text: str, field: str, value: object) -> None:
    assert getattr(parse("", **{var: text}), field) == value


def test_env_beats_file() -> None:
    c = parse('api_port = 9100\nstate_file = "/a"', TEI_MANAGER_API_PORT="9200")
    assert (c.api_port, c.state_file) == (9200, "/a")


def test_every_documented_env_var_is_wired() -> None:
    assert {var for var, _, _ in ENV_OVERRIDES} == {
        "TEI_MANAGER_API_PORT",
        "TEI_MANAGER_API_MAX_CONNECTIONS",
        "TEI_MANAGER_GRPC_PORT",
        "TEI_MANAGER_STATE_FILE",
        "TEI_MANAGER_HEALTH_CHECK_INTERVAL",
        "TEI_BINARY_PATH",
        "TEI_MANAGER_GRPC_ENABLED",
        "TEI_MANAGER_LOG_DIR",
        "TEI_MANAGER_API_KEEP_ALIVE_TIMEOUT",
        "TEI_MANAGER_RESTART_BACKOFF_INITIAL",
        "TEI_MANAGER_RESTART_BACKOFF_MAX",
        "TEI_MANAGER_CRASH_LOOP_RESTARTS",
        "TEI_MANAGER_CRASH_LOOP_WINDOW",
        "TEI_MANAGER_GRPC_MAX_PARALLEL_STREAMS",
        "TEI_MANAGER_GRPC_MAX_CONNECTIONS",
        "TEI_MANAGER_GRPC_HANDSHAKE_TIMEOUT",
        "TEI_MANAGER_GRPC_IDLE_TIMEOUT",
        "TEI_MANAGER_GRPC_KEEPALIVE_INTERVAL",
        "TEI_MANAGER_OTEL_ENDPOINT",
        "TEI_MANAGER_OTEL_SERVICE_NAME",
        "TEI_MANAGER_OTEL_SAMPLE_RATIO",
        "TEI_MANAGER_READY_REQUIRES_INSTANCES",
    }
    fields = set(ManagerConfig.__struct_fields__)
    grpc_fields = {f"grpc.{name}" for name in GrpcConfig.__struct_fields__}
    otel_fields = {f"otel.{name}" for name in OtelConfig.__struct_fields__}
    assert all(field in fields | grpc_fields | otel_fields for _, field, _ in ENV_OVERRIDES)


def test_grpc_section_and_its_env_overrides() -> None:
    text = "grpc_max_parallel_streams = 64\n[grpc]\nmax_connections = 9\nidle_timeout_secs = 60"
    c = parse(text, TEI_MANAGER_GRPC_KEEPALIVE_INTERVAL="15", TEI_MANAGER_GRPC_MAX_CONNECTIONS="7")
    assert (c.grpc.max_connections, c.grpc.idle_timeout_secs) == (7, 60.0)
    limits = c.grpc.limits(max_concurrent_streams=c.grpc_max_parallel_streams)
    assert limits.max_concurrent_streams == 64
    assert limits.keepalive_interval_secs == 15.0
    assert limits.max_continuation_frames == Limits().max_continuation_frames  # not tunable


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[grpc]\nmax_connections = 0", {}, "grpc.max_connections: 0 is invalid"),
        ("[grpc]\nidle_timeout_secs = 0", {}, "grpc.idle_timeout_secs: 0.0 is invalid"),
        ("[grpc]\nstream_receive_window_bytes = 10", {}, "grpc.stream_receive_window_bytes: 10"),
        ("[grpc]\nmax_header_list_bytes = 10", {}, "grpc.max_header_list_bytes: 10 is invalid"),
        ("[grpc]\nkeepalive_interval_secs = -1", {}, "grpc.keepalive_interval_secs: -1.0"),
        ("[grpc]\nnope = 1", {}, 'grpc: unknown field "nope"'),
        (
            "",
            {"TEI_MANAGER_GRPC_HANDSHAKE_TIMEOUT": "-2"},
            "grpc.handshake_timeout_secs (from TEI_MANAGER_GRPC_HANDSHAKE_TIMEOUT): -2.0",
        ),
    ],
)
def test_invalid_grpc_section(text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, **env)
    assert str(info.value).startswith(message)


def test_empty_env_var_means_unset() -> None:
    assert parse("api_port = 9100", TEI_MANAGER_API_PORT="").api_port == 9100


@pytest.mark.parametrize(
    ("var", "text", "message"),
    [
        ("TEI_MANAGER_API_PORT", "nine", 'TEI_MANAGER_API_PORT: "nine" is not an integer'),
        ("TEI_MANAGER_HEALTH_CHECK_INTERVAL", "soon", 'TEI_MANAGER_HEALTH_CHECK_INTERVAL: "soon"'),
        ("TEI_MANAGER_GRPC_ENABLED", "maybe", 'TEI_MANAGER_GRPC_ENABLED: "maybe" is not a bool'),
        (
            "TEI_MANAGER_READY_REQUIRES_INSTANCES",
            "seeds",
            'TEI_MANAGER_READY_REQUIRES_INSTANCES: "seeds" is not a boolean: use true or false',
        ),
        ("TEI_MANAGER_API_PORT", "80", "api_port (from TEI_MANAGER_API_PORT): 80 is privileged"),
        (
            "TEI_MANAGER_HEALTH_CHECK_INTERVAL",
            "-1",
            "health_check_interval_secs (from TEI_MANAGER_HEALTH_CHECK_INTERVAL): -1.0 is invalid",
        ),
        (
            "TEI_MANAGER_API_KEEP_ALIVE_TIMEOUT",
            "0",
            "api_keep_alive_timeout_secs (from TEI_MANAGER_API_KEEP_ALIVE_TIMEOUT): 0.0 is invalid",
        ),
        (
            "TEI_MANAGER_CRASH_LOOP_RESTARTS",
            "-2",
            "crash_loop_restarts (from TEI_MANAGER_CRASH_LOOP_RESTARTS): -2 is invalid",
        ),
    ],
)
def test_bad_env_values_name_the_variable(var: str, text: str, message: str) -> None:
    assert config_error("", **{var: text}).startswith(message)


# --- file validation: one line naming field and rule --------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api_port = 80", "api_port: 80 is privileged: use 1024-65535"),
        ("grpc_port = 70000", "grpc_port: 70000 is out of range: use 1024-65535"),
        ("api_port = -1", "api_port: -1 is out of range: use 1024-65535"),
        ("grpc_port = 9000", "grpc_port: 9000 is also api_port: use another"),
        ("foo = 1", 'unknown field "foo"'),
        ("api_port = '9000'", "api_port: expected int, got str"),
        ("grpc_enabled = 1", "grpc_enabled: expected bool, got int"),
        ('ready_requires_instances = "yes"', "ready_requires_instances: expected bool, got str"),
        ('api_host = ""', "api_host: must not be empty"),
        ('state_file = ""', "state_file: must not be empty"),
        ("health_check_interval_secs = 0", "health_check_interval_secs: 0.0 is invalid: use a"),
        ("health_check_interval_secs = nan", "health_check_interval_secs: nan is invalid"),
        ("api_keep_alive_timeout_secs = -1", "api_keep_alive_timeout_secs: -1.0 is invalid"),
        ("api_keep_alive_timeout_secs = inf", "api_keep_alive_timeout_secs: inf is invalid"),
        ("api_max_connections = 0", "api_max_connections: 0 is invalid: use 1-"),
        ("api_max_connections = 1.5", "api_max_connections: expected int, got float"),
        ("health_check_initial_delay_secs = -1", "health_check_initial_delay_secs: -1.0 is inv"),
        ("startup_timeout_secs = inf", "startup_timeout_secs: inf is invalid"),
        ("max_failures_before_restart = -1", "max_failures_before_restart: -1 is invalid"),
        ("graceful_shutdown_timeout_secs = -5", "graceful_shutdown_timeout_secs: -5.0 is inv"),
        ("max_instances = 0", "max_instances: 0 is invalid: use a number >= 1"),
        ("instance_port_start = 80", "instance_port_start: 80 is privileged: use 1024-65535"),
        ("instance_port_start = 0", "instance_port_start: 0 is out of range"),
        (
            "instance_port_start = 9000\ninstance_port_end = 8000",
            "instance_port_end: 8000 is below instance_port_start 9000",
        ),
        ("grpc_max_message_size_mb = 0", "grpc_max_message_size_mb: 0 is invalid"),
        ("grpc_max_message_size_mb = 4096", "grpc_max_message_size_mb: 4096 is too large"),
        ("grpc_max_parallel_streams = 0", "grpc_max_parallel_streams: 0 is invalid"),
        ("grpc_request_timeout_secs = 0", "grpc_request_timeout_secs: 0.0 is invalid"),
        ("max_queued_requests = -1", "max_queued_requests: -1 is invalid"),
        ("queue_timeout_secs = 0", "queue_timeout_secs: 0.0 is invalid"),
        ('tei_binary_path = ""', "tei_binary_path: must not be empty"),
        ("restart_backoff_initial_secs = 0", "restart_backoff_initial_secs: 0.0 is invalid"),
        ("restart_backoff_max_secs = inf", "restart_backoff_max_secs: inf is invalid"),
        (
            "restart_backoff_initial_secs = 10\nrestart_backoff_max_secs = 5",
            "restart_backoff_max_secs: 5 is below restart_backoff_initial_secs 10",
        ),
        ("crash_loop_restarts = -1", "crash_loop_restarts: -1 is invalid: use a number >= 0"),
        ("crash_loop_window_secs = 0", "crash_loop_window_secs: 0.0 is invalid"),
        ('models = ["ok/model", "../etc"]', "models[1]: \"../etc\" contains a '..' component"),
        ('models = ["a/b", "a/b"]', 'models[1]: duplicate model "a/b"'),
        ("api_port = ", "invalid TOML: Invalid value (at end of document)"),
    ],
)
def test_invalid_manager_config(text: str, message: str) -> None:
    assert config_error(text).startswith(message)


def seeds(*bodies: str, head: str = "") -> str:
    return head + "".join(f"\n[[instances]]\n{b}\n" for b in bodies)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (seeds('name = "a"\nmodel_id = "x"', 'name = "a"\nmodel_id = "y"'),
         'instances[1].name: duplicate name "a"'),
        (seeds('name = "a"\nmodel_id = "x"\nbar = 1'), 'instances[0]: unknown field "bar"'),
        (seeds('model_id = "x"'), "instances[0].name: required field is missing"),
        (seeds('name = "a b"\nmodel_id = "x"'), 'instances[0].name: "a b" is not allowed'),
        (seeds('name = "a"\nmodel_id = "x"\nport = 80'),
         "instances[0].port: 80 is privileged: use 1024-65535"),
        (seeds('name = "a"\nmodel_id = "x"\npooling = "max"'),
         'instances[0].pooling: "max" is not allowed: use cls|mean|splade|last-token'),
        (seeds('name = "a"\nmodel_id = "x"\nengine = "tensorrt"'),
         'instances[0].engine: "tensorrt" is not allowed: use auto|torch|onnx'),
        (seeds('name = "a"\nmodel_id = "x"\nport = 9000'),
         "instances[0].port: 9000 is already used by api_port"),
        (seeds('name = "a"\nmodel_id = "x"\nport = 8100',
               'name = "b"\nmodel_id = "x"\nprometheus_port = 8100'),
         "instances[1].prometheus_port: 8100 is already used by instances[0].port"),
        (seeds('name = "a"\nmodel_id = "x"', 'name = "b"\nmodel_id = "x"',
               head="max_instances = 1"),
         "instances: 2 seeds exceed max_instances = 1"),
        (seeds('name = "a"\nmodel_id = "x"\nauto_start = "yes"'),
         "instances[0].auto_start: expected bool, got str"),
    ],
)  # fmt: skip
def test_invalid_seeds(text: str, message: str) -> None:
    assert config_error(text).startswith(message)


def test_seed_ports_may_reuse_grpc_port_when_grpc_is_disabled() -> None:
    c = parse(seeds('name = "a"\nmodel_id = "x"\nport = 9001', head="grpc_enabled = false"))
    assert c.instances[0].port == 9001


def test_zero_ports_mean_auto_and_may_repeat() -> None:
    c = parse(seeds('name = "a"\nmodel_id = "x"\nport = 0', 'name = "b"\nmodel_id = "x"\nport = 0'))
    assert [s.port for s in c.instances] == [0, 0]


def test_seed_instance_config_drops_auto_start() -> None:
    seed = SeedInstance(name="a", model_id="x", port=8100, auto_start=False)
    plain = seed.instance_config()
    assert type(plain) is InstanceConfig
    assert plain == InstanceConfig(name="a", model_id="x", port=8100)


# --- instance validation (shared with the REST API) ---------------------------


@pytest.mark.parametrize("name", ["a", "A9", "bge-small", "x.y_z-1", "9" * 63])
def test_valid_names(name: str) -> None:
    validate_name(name)


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "must not be empty"),
        ("a" * 64, "is 64 characters: use at most 63"),
        ("-a", "is not allowed"),
        (".hidden", "is not allowed"),
        ("a/b", "is not allowed"),
        ("a\\b", "is not allowed"),
        ("a b", "is not allowed"),
        ("é", "is not allowed"),
        ("a\n", "is not allowed"),
    ],
)
def test_invalid_names(name: str, rule: str) -> None:
    with pytest.raises(ValidationError, match=rule) as info:
        validate_name(name)
    assert info.value.code is ErrorCode.INVALID_NAME
    assert info.value.field == "name"


@pytest.mark.parametrize(
    "model_id",
    [
        "BAAI/bge-small-en-v1.5",
        "sentence-transformers/all-MiniLM-L6-v2",
        "gpt2",
        "org_1/Model.v2",
        "/models/bge",
        "/models/with space/and.dots",
        "/a",
    ],
)
def test_valid_model_ids(model_id: str) -> None:
    validate_model_id(model_id)


@pytest.mark.parametrize(
    ("model_id", "rule"),
    [
        ("", "must not be empty"),
        ("../etc/passwd", "contains a '..' component"),
        ("/models/../etc", "contains a '..' component"),
        ("/models/x/..", "contains a '..' component"),
        ("a\\b", "contains a backslash"),
        ("a/b\x00", "contains a control character"),
        ("a/b\n", "contains a control character"),
        ("a/b/c", "is not 'org/name', 'name' or an absolute path"),
        ("./model", "is not a valid Hugging Face id"),
        ("org/", "is not a valid Hugging Face id"),
        ("/", "'/' is not a model directory"),
        ("org/-name", "is not a valid Hugging Face id"),
        ("org/name-", "is not a valid Hugging Face id"),
        ("org/na--me", "is not a valid Hugging Face id"),
        ("org/na..me", "is not a valid Hugging Face id"),
        ("org/na me", "is not a valid Hugging Face id"),
        ("org/" + "n" * 97, "is not a valid Hugging Face id"),
        ("/" + "p" * 5000, "use at most 4096"),
    ],
)
def test_invalid_model_ids(model_id: str, rule: str) -> None:
    with pytest.raises(ValidationError, match=rule) as info:
        validate_model_id(model_id)
    assert info.value.code is ErrorCode.INVALID_MODEL_ID
    assert info.value.field == "model_id"


@pytest.mark.parametrize(("port", "ok"), [(1024, True), (65535, True), (0, False), (1, False),
                                          (1023, False), (65536, False), (-5, False)])  # fmt: skip
def test_validate_port(port: int, ok: bool) -> None:
    if ok:
        validate_port(port)
        return
    with pytest.raises(ValidationError) as info:
        validate_port(port)
    assert info.value.code is ErrorCode.INVALID_PORT


def test_validate_port_zero_is_auto_where_allowed() -> None:
    validate_port(0, allow_zero=True)


def instance(**fields: object) -> InstanceConfig:
    return InstanceConfig(**{"name": "a", "model_id": "org/m", **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"port": 80}, ErrorCode.INVALID_PORT, "port: 80 is privileged: use 1024-65535"),
        ({"prometheus_port": 22}, ErrorCode.INVALID_PORT, "prometheus_port: 22 is privileged"),
        ({"port": 8100, "prometheus_port": 8100}, ErrorCode.INVALID_PORT,
         "prometheus_port: 8100 is also the instance's port: use another"),
        ({"gpu_id": -1}, ErrorCode.INVALID_GPU_ID, "gpu_id: -1 is negative"),
        ({"max_batch_tokens": 0}, ErrorCode.VALIDATION_ERROR, "max_batch_tokens: 0 is invalid"),
        ({"max_concurrent_requests": -1}, ErrorCode.VALIDATION_ERROR,
         "max_concurrent_requests: -1 is invalid"),
        ({"startup_timeout_secs": 0.0}, ErrorCode.VALIDATION_ERROR,
         "startup_timeout_secs: 0.0 is invalid"),
        ({"revision": ""}, ErrorCode.VALIDATION_ERROR, "revision: must not be empty"),
        ({"revision": "a\nb"}, ErrorCode.VALIDATION_ERROR, "revision: contains a control"),
        ({"served_model_name": ""}, ErrorCode.VALIDATION_ERROR,
         "served_model_name: must not be empty"),
        ({"served_model_name": " x"}, ErrorCode.VALIDATION_ERROR,
         "served_model_name: has leading or trailing whitespace"),
        ({"served_model_name": "x" * 256}, ErrorCode.VALIDATION_ERROR,
         "served_model_name: is 256 characters"),
        ({"extra_args": ("ok", "a\x00b")}, ErrorCode.VALIDATION_ERROR,
         "extra_args[1]: contains a NUL byte"),
        ({"extra_args": ("--port", "1")}, ErrorCode.VALIDATION_ERROR,
         "extra_args[0]: --port is set by the manager: use the config field"),
        ({"extra_args": ("--dtype", "x", "--model-id=evil")}, ErrorCode.VALIDATION_ERROR,
         "extra_args[2]: --model-id is set by the manager"),
    ],
)  # fmt: skip
def test_invalid_instance(fields: dict[str, object], code: ErrorCode, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_instance_config(instance(**fields))
    assert info.value.code is code
    assert str(info.value).startswith(message)


def test_valid_instance_with_every_field() -> None:
    validate_instance_config(
        instance(
            port=8100,
            prometheus_port=0,
            gpu_id=0,
            pooling="last-token",
            startup_timeout_secs=5.0,
            extra_args=("--dtype", "float16", "--hostname", "127.0.0.1"),
            revision="refs/pr/1",
            served_model_name="text-embedding-3-small",
        ),
        gpu_count=1,
    )


def test_gpu_id_must_exist_when_gpu_count_is_known() -> None:
    validate_instance_config(instance(gpu_id=1), gpu_count=2)
    with pytest.raises(ValidationError, match=r"gpu_id: 2 does not exist: this host has GPUs 0-1"):
        validate_instance_config(instance(gpu_id=2), gpu_count=2)
    with pytest.raises(ValidationError, match="this host has no GPU") as info:
        validate_instance_config(instance(gpu_id=0), gpu_count=0)
    assert info.value.code is ErrorCode.INVALID_GPU_ID


# --- decoding the REST create request ----------------------------------------


def test_integral_numbers_are_integers_as_in_json_schema() -> None:
    body = b'{"name": "b", "model_id": "m", "max_concurrent_requests": 64.0, "gpu_id": 0.0}'
    config = decode_instance_config(body, gpu_count=1)
    assert (config.max_concurrent_requests, config.gpu_id) == (64, 0)
    assert isinstance(config.max_concurrent_requests, int)
    with pytest.raises(ValidationError, match="max_concurrent_requests"):
        decode_instance_config(b'{"name": "b", "model_id": "m", "max_concurrent_requests": 6.5}')


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("max_batch_tokens", 2**31, ErrorCode.VALIDATION_ERROR),
        ("max_concurrent_requests", 2**63, ErrorCode.VALIDATION_ERROR),
        ("gpu_id", 2**31, ErrorCode.INVALID_GPU_ID),
    ],
)
def test_counts_are_bounded_as_documented(field: str, value: int, code: ErrorCode) -> None:
    body = json.dumps({"name": "b", "model_id": "m", field: value}).encode()
    with pytest.raises(ValidationError) as info:
        decode_instance_config(body)
    assert info.value.code is code
    assert field in str(info.value)


def test_decode_instance_config() -> None:
    body = b'{"name": "bge", "model_id": "BAAI/bge-small-en-v1.5", "port": 0, "pooling": "cls"}'
    assert decode_instance_config(body) == InstanceConfig(
        name="bge", model_id="BAAI/bge-small-en-v1.5", port=0, pooling="cls"
    )
    assert parse_instance_config({"name": "bge", "model_id": "m", "extra_args": ["-v"]}) == (
        InstanceConfig(name="bge", model_id="m", extra_args=("-v",))
    )


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"{", ErrorCode.MALFORMED_JSON, "body: invalid JSON:"),
        (b"", ErrorCode.MALFORMED_JSON, "body: invalid JSON:"),
        (b"[]", ErrorCode.VALIDATION_ERROR, "body: expected object, got array"),
        (b'{"name": "a", "model_id": "m", "foo": 1}', ErrorCode.VALIDATION_ERROR,
         'unknown field "foo"'),
        (b'{"name": "a", "model_id": "m", "auto_start": false}', ErrorCode.VALIDATION_ERROR,
         'unknown field "auto_start"'),
        (b'{"model_id": "m"}', ErrorCode.VALIDATION_ERROR, "name: required field is missing"),
        (b'{"name": "a", "model_id": "m", "port": "8080"}', ErrorCode.VALIDATION_ERROR,
         "port: expected int | null, got str"),
        (b'{"name": "a", "model_id": "m", "port": 80}', ErrorCode.INVALID_PORT,
         "port: 80 is privileged: use 1024-65535"),
        (b'{"name": "a", "model_id": "m", "extra_args": ["x", 2]}', ErrorCode.VALIDATION_ERROR,
         "extra_args[1]: expected str, got int"),
        (b'{"name": "a", "model_id": "m", "pooling": "max"}', ErrorCode.VALIDATION_ERROR,
         'pooling: "max" is not allowed: use cls|mean|splade|last-token'),
        (b'{"name": "a/b", "model_id": "m"}', ErrorCode.INVALID_NAME, 'name: "a/b" is not'),
        (b'{"name": "a", "model_id": "../m"}', ErrorCode.INVALID_MODEL_ID,
         "model_id: \"../m\" contains a '..' component"),
        (b'{"name": "a", "model_id": "m", "gpu_id": 3}', ErrorCode.INVALID_GPU_ID,
         "gpu_id: 3 does not exist"),
    ],
)  # fmt: skip
def test_decode_instance_config_errors(body: bytes, code: ErrorCode, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        decode_instance_config(body, gpu_count=1)
    assert info.value.code is code
    assert str(info.value).startswith(message)
    assert info.value.http_status == 400


def test_parse_instance_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        parse_instance_config({"name": "a", "model_id": "m", "gpu_id": "zero"})
    assert info.value.field == "gpu_id"


def test_instance_config_json_round_trip() -> None:
    config = instance(port=8100, pooling="mean", extra_args=("--x",), revision="v1")
    assert decode_instance_config(msgspec.json.encode(config)) == config


# --- the original's Arrow settings ---------------------------------------------------
def test_arrow_settings_default_and_original_names() -> None:
    default = parse("")
    assert default.arrow_output_dtype == "f32"
    assert default.stream_batch_concurrency() == 4
    c = parse('arrow_output_dtype = "f16"\ngrpc_stream_max_concurrent_batches = 16')
    assert (c.arrow_output_dtype, c.stream_batch_concurrency()) == ("f16", 16)


@pytest.mark.parametrize(("given", "used"), [(0, 1), (-3, 1), (1, 1), (64, 64), (1000, 64)])
def test_stream_batches_are_clamped_to_1_64_as_the_original_does(given: int, used: int) -> None:
    c = parse(f"grpc_stream_max_concurrent_batches = {given}")
    assert c.grpc_stream_max_concurrent_batches == given
    assert c.stream_batch_concurrency() == used


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('arrow_output_dtype = "f64"', 'arrow_output_dtype: "f64" is not allowed: use f32|f16'),
        ("arrow_output_dtype = 16", "arrow_output_dtype: expected str, got int: use f32|f16"),
        (
            'grpc_stream_max_concurrent_batches = "4"',
            "grpc_stream_max_concurrent_batches: expected int, got str",
        ),
    ],
)
def test_invalid_arrow_settings_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value) == message
