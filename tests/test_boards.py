"""Boards described in a file: each driver against its datasheet's worked example, the board file's errors, and a
board with five kinds of parts end to end on a virtual board (values with units at the gateway, an output switched
from the twin, a contact's change reported at once, a chip that does not answer refused before anything is written)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from edgetrio.tools.boards import BoardError, check_board, load_board
from edgetrio.tools.bundle import FIRMWARE
from edgetrio.tools.testkit import ROOT, Daemon, blank_board, cli, virtual_boards, wait_until
from edgetrio.tools.vdev import micropython


def run_micropython(tmp_path: Path, code: str) -> list[str]:
    script = tmp_path / "t.py"
    script.write_text(code)
    proc = subprocess.run([micropython(), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"MICROPYPATH": f"{FIRMWARE / 'lib'}:{FIRMWARE / 'sim'}:.frozen"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def test_each_driver_gives_its_datasheets_worked_example(tmp_path: Path) -> None:
    out = run_micropython(tmp_path, """
from drv_sht3x import crc8, convert
print(hex(crc8(b"\\xbe\\xef")))
frame = bytes([0x66, 0x66, crc8(b"\\x66\\x66"), 0x80, 0x00, crc8(b"\\x80\\x00")])
print("%.2f %.2f" % convert(frame))
try:
    convert(frame[:2] + bytes([frame[2] ^ 1]) + frame[3:])
except ValueError as e:
    print("refused", e)
from drv_ds18b20 import temperature
print(" ".join(str(temperature(bytes([raw & 0xFF, raw >> 8]))) for raw in
               (0x07D0, 0x0550, 0x0191, 0x00A2, 0x0008, 0x0000, 0xFFF8, 0xFF5E, 0xFE6F, 0xFC90)))
from drv_dht22 import decode
print(decode(bytes([0x02, 0x8C, 0x01, 0x5F, 0xEE])), decode(bytes([0x02, 0x8C, 0x80, 0x65, 0x73])))
print(decode(bytes([45, 0, 23, 4, 72]), True))
try:
    decode(bytes([0x02, 0x8C, 0x01, 0x5F, 0xEF]))
except ValueError as e:
    print("refused", e)
from drv_bh1750 import lux
print(round(lux(0x83, 0x90)))
""")
    # SHT3x datasheet 4.12: CRC-8 of 0xBEEF is 0x92; a word of 0x6666 is 25.00 degC, 0x8000 is 50.00 %RH (4.13)
    assert out[0] == "0x92" and out[1] == "25.00 50.00" and out[2].startswith("refused CRC")
    # DS18B20 datasheet table 1, the temperature/data relationship, from +125 to -55 degC
    assert out[3] == "125.0 85.0 25.0625 10.125 0.5 0.0 -0.5 -10.125 -25.0625 -55.0"
    # AM2302 (DHT22) datasheet: 02 8C 01 5F EE is 65.2 %RH, 35.1 degC; the sign bit makes 80 65 -10.1 degC; a DHT11
    # sends whole numbers and tenths
    assert out[4] == "(35.1, 65.2) (-10.1, 65.2)" and out[5] == "(23.4, 45.0)" and out[6].startswith("refused check")
    assert out[7] == "28067"  # BH1750 datasheet: a count of 0x8390 is 28067 lx


def test_filters_shape_what_a_board_reads(tmp_path: Path) -> None:
    out = run_micropython(tmp_path, """
from components import Filter
print(Filter({"calibrate": [[0.5, 0], [2.9, 100]]}).apply(1.7, 0))
print(Filter({"offset": -0.5, "multiply": 2}).apply(10, 0))
m = Filter({"median": 3})
print([m.apply(v, 0) for v in (20, 95, 21, 22, 23)])
a = Filter({"average": 2})
print([a.apply(v, 0) for v in (10, 20, 30)])
d = Filter({"delta": 0.5})
print([d.apply(v, 0) for v in (20.0, 20.2, 20.6, 20.7)])
t = Filter({"throttle": 1})
print([t.apply(v, ms) for v, ms in ((1, 0), (2, 500), (3, 1000), (4, 1500))])
""")
    assert out == ["50.0", "19.5", "[20, 20, 21, 22, 22]", "[10.0, 15.0, 25.0]", "[20.0, None, 20.6, None]",
                   "[1, None, 3, None]"]


def one_line(where: Path, text: str) -> str:
    where.write_text(text)
    with pytest.raises(BoardError) as caught:
        load_board(where)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(where)), message
    return message


def test_a_board_files_mistakes_are_one_line_each(tmp_path: Path) -> None:
    f = tmp_path / "b.toml"
    part = '[[component]]\ndriver = "{}"\n{}\n'
    assert "unknown driver 'sht99'" in one_line(f, part.format("sht99", ""))
    assert "GPIO4 is used twice" in one_line(f, part.format("switch", "pin = 4") + part.format("ds18b20", "pin = 4"))
    assert "input only (34-39)" in one_line(f, part.format("switch", "pin = 35"))
    assert "ADC2" in one_line(f, part.format("adc", "pin = 25"))
    assert "flash chip" in one_line(f, part.format("binary_input", "pin = 7"))
    assert "no GPIO24" in one_line(f, part.format("binary_input", "pin = 24"))
    assert "answers at 0x44 or 0x45" in one_line(f, part.format("sht3x", "address = 0x40"))
    assert "two chips at 0x44" in one_line(f, part.format("sht3x", "") + part.format("sht3x", ""))
    assert "unknown filter 'smooth'" in one_line(f, part.format("sht3x", "filters = { smooth = 3 }"))
    assert "calibrate is two" in one_line(f, part.format("adc", "pin = 34\nfilters = { calibrate = [[1, 0]] }"))
    assert "reports 'temperature', as component 1" in one_line(f, part.format("sht3x", "") + part.format("bme280", ""))
    assert "firmware's own settings" in one_line(f, part.format("switch", 'pin = 12\nname = "led"'))
    assert "not valid TOML" in one_line(f, "[[component]\n")
    assert "no [[component]]" in one_line(f, "[board]\nmodel = \"x\"\n")
    # what a new user tried (a walk with only the docs): values that are no numbers, pins that cannot drive a bus,
    # filters that cannot work, more parts than a board's heap takes
    assert "multiply is a number" in one_line(f, part.format("adc", "pin = 34\nfilters = { multiply = nan }"))
    assert "offset is a number" in one_line(f, part.format("adc", "pin = 34\nfilters = { offset = inf }"))
    assert "throttle is a number, 0 to 86400" in one_line(f, part.format("sht3x", "filters = { throttle = 1e300 }"))
    assert "I2C needs pins that can drive" in one_line(f, part.format("sht3x", "scl = 34"))
    assert "sda and scl are both GPIO21" in one_line(f, part.format("sht3x", "scl = 21"))
    assert "median or average, not both" in one_line(f, part.format("sht3x", "filters = { median = 3, average = 3 }"))
    assert "a contact reports true or false" in one_line(f, part.format("binary_input",
                                                                        "pin = 13\nfilters = { multiply = 3 }"))
    assert "per_pulse is a number above 0" in one_line(f, part.format("pulse_counter", "pin = 25\nper_pulse = 0"))
    assert "its values are humidity, temperature" in one_line(f, part.format("dht22", "pin = 4\nfilters = { "
                                                                                      "pressure = { offset = 1 } }"))
    assert "up to 32 lower-case" in one_line(f, part.format("chip", f'name = "{"a" * 33}"'))
    assert "a board takes up to 24" in one_line(f, part.format("chip", "") * 25)
    assert "online every 1 to 1000 readings" in one_line(f, "[board]\nbattery = 0\n" + part.format("chip", ""))
    assert "online every 1 to 1000 readings" in one_line(f, "[board]\nbattery = true\n" + part.format("chip", ""))
    f.write_text("[board]\nbattery = 6\n" + part.format("chip", ""))
    assert load_board(f).config()["battery"] == {"send_every": 6}  # a battery board, from its file
    # ADC2 is fine without Wi-Fi (a board on the serial link); two chips share a bus; a calibrated value has no range
    (tmp_path / "ok.toml").write_text(part.format("adc", 'pin = 25\nname = "soil"\nfilters = { calibrate = '
                                                         '[[2.8, 0], [1.2, 100]] }\nunit = "%"')
                                      + part.format("sht3x", "") + part.format("bh1750", ""))
    board = load_board(tmp_path / "ok.toml", wifi=False)
    assert board.i2c_buses == {(21, 22): {0x44: f"{tmp_path / 'ok.toml'}: component 2 (sht3x)",
                                          0x23: f"{tmp_path / 'ok.toml'}: component 3 (bh1750)"}}
    assert board.model_document()["resources"][0] == {"name": "soil", "type": "float", "unit": "%", "access": "r"}


GREENHOUSE = """
[board]
model = "greenhouse-test"
period = 1

[[component]]
driver = "sht3x"
name = "air"

[[component]]
driver = "ds18b20"
pin = 4
name = "soil"
count = 2

[[component]]
driver = "binary_input"
pin = 13
name = "door"
device_class = "door"
debounce_ms = 20

[[component]]
driver = "switch"
pin = 12
name = "pump"

[[component]]
driver = "pwm"
pin = 14
name = "lamp"

[[component]]
driver = "pulse_counter"
pin = 27
name = "water"
per_pulse = 0.5
unit = "L"
"""


def test_a_described_board_reports_every_part_with_units_and_takes_its_outputs_from_the_twin(
        daemon: Daemon, tmp_path: Path) -> None:
    board_file = tmp_path / "greenhouse.toml"
    board_file.write_text(GREENHOUSE)
    with virtual_boards(daemon, "gh", 1, period=1, extra=("--board", str(board_file))) as (device,):
        rows = wait_until(lambda: [r for r in daemon.readings(device, missing_ok=True)
                                   if {"air_temperature", "soil_1", "soil_2", "water"} <= set(r["values"])], timeout=60)
        values = rows[-1]["values"]
        assert 5 < values["air_temperature"] < 40 and 0 < values["air_humidity"] < 100
        assert values["soil_2"] < values["soil_1"] < values["air_temperature"]  # each probe a little cooler
        assert values["water"] >= 0 and "water_rate" in values
        # the model follows from the board: registered by vdev, with units and the outputs writable
        models = {m["name"]: m for m in json.loads(daemon.cli("model", "list", "--json").stdout)}
        resources = {r["name"]: r for r in models["greenhouse-test"]["resources"]}
        assert resources["air_temperature"]["unit"] == "C" and resources["water"]["unit"] == "L"
        assert resources["water_rate"]["unit"] == "L/min"
        assert resources["pump"]["access"] == "rw" and resources["lamp"] == {
            "name": "lamp", "type": "float", "unit": "%", "access": "rw", "min": 0, "max": 100}
        listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
        assert listed[device]["model"] == "greenhouse-test" and not listed[device]["refused"]
        # outputs from the twin: the board reports what it set; a value out of range is refused by the gateway
        daemon.cli("twin", "set", device, "pump=true", "lamp=40")
        twin = wait_until(lambda: (t := json.loads(daemon.cli("twin", "get", device, "--json").stdout))["reported"][
            "state"].get("lamp") == 40 and t)
        assert twin["reported"]["state"]["pump"] is True and not twin["reported"]["state"].get("rejected")
        refused = daemon.cli("twin", "set", device, "lamp=140", check=False)
        assert refused.returncode != 0 and "above maximum" in refused.stderr
        # the door closes (the contact pulls its pin low): a reading with it at once, not at the next period
        cli(daemon.data_dir, "fault", device, "env", "gpio13=0")
        door = wait_until(lambda: [r for r in daemon.readings(device) if r["values"].get("door") is False],
                          timeout=10)
        assert set(door[0]["values"]) == {"door"}
        bogus = cli(daemon.data_dir, "fault", device, "env", "gpio99=0", check=False)
        assert bogus.returncode == 1 and "gpioN (an input pin's level" in bogus.stderr


def test_flashing_refuses_a_chip_that_does_not_answer_before_writing_anything(daemon: Daemon, tmp_path: Path) -> None:
    wired = tmp_path / "wired.toml"
    wired.write_text('[[component]]\ndriver = "sht3x"\naddress = 0x44\n')
    claimed = tmp_path / "claimed.toml"
    claimed.write_text('[[component]]\ndriver = "sht3x"\naddress = 0x45\n')
    tty = tmp_path / "ttyBLANK"
    with blank_board(daemon.data_dir, tty, "blank", extra=("--board", str(wired))):
        info = json.loads((daemon.data_dir / "daemon.json").read_text())
        args = ["flash", "--port", str(tty), "--device-id", "sht-1", "--broker", f"127.0.0.1:{info['mqtt_port']}",
                "--board"]
        refused = cli(daemon.data_dir, *args, str(claimed), check=False)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "nothing answers at 0x45 on GPIO21 (SDA) / GPIO22 (SCL); the bus has 0x44" in refused.stderr
        assert "copying" not in refused.stdout
        done = cli(daemon.data_dir, *args, str(wired), "--period", "0.5", check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "model board-wired: temperature (C), humidity (%)" in done.stdout
        rows = wait_until(lambda: daemon.readings("sht-1", missing_ok=True))
        assert set(rows[-1]["values"]) == {"temperature", "humidity"}


def test_the_cli_checks_a_board_file_before_it_starts_boards(daemon: Daemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[component]]\ndriver = "relay"\npin = 12\n')
    for command in (["vdev", "--board", str(bad)], ["flash", "--out", str(tmp_path / "b"), "--device-id", "x",
                                                    "--broker", "h", "--board", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "edgetrio", *command, "--data-dir", str(daemon.data_dir)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 2 and "unknown driver 'relay'" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert check_board(Path("x.toml"), {"component": [{"driver": "chip"}]}).model == "board-x"


@pytest.mark.parametrize("example", ["greenhouse", "door-window", "energy-meter"])
def test_the_documented_example_boards_run_as_written(daemon: Daemon, example: str) -> None:
    board_file = ROOT / "examples" / "boards" / f"{example}.toml"
    board = load_board(board_file)
    readable = {r["name"] for r in board.resources if r["access"] == "r"}
    with virtual_boards(daemon, example, 1, period=1, extra=("--board", str(board_file))) as (
            device,):
        latest: dict[str, object] = {}

        def every_part_read() -> bool:  # parts read at their own intervals come in different readings
            for row in daemon.readings(device, missing_ok=True):
                latest.update(row["values"])
            return readable <= set(latest)

        wait_until(every_part_read, timeout=150)
        listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}
        assert listed[device]["model"] == board.model and not listed[device]["refused"]
        model = {m["name"]: m for m in json.loads(daemon.cli("model", "list", "--json").stdout)}[board.model]
        assert {r["name"] for r in model["resources"]} == {r["name"] for r in board.resources}
        assert all(isinstance(v, bool) if r["type"] == "bool" else isinstance(v, float | int)
                   for r in board.resources if (v := latest.get(r["name"])) is not None)


def test_a_model_given_by_hand_wins_and_what_it_lacks_is_shown_loudly(daemon: Daemon, tmp_path: Path) -> None:
    hand = tmp_path / "hand.toml"
    hand.write_text('name = "by-hand"\n[[resources]]\nname = "temperature"\ntype = "float"\nunit = "C"\n')
    daemon.cli("model", "add", str(hand))
    daemon.add_device("hand-1", "--model", "by-hand")
    board_file = tmp_path / "sht.toml"
    board_file.write_text('[[component]]\ndriver = "sht3x"\n')
    with virtual_boards(daemon, "hand", 1, period=1, extra=("--board", str(board_file))):
        listed = wait_until(lambda: (d := {d["id"]: d for d in json.loads(
            daemon.cli("device", "list", "--json").stdout)}["hand-1"]) and d["model_lacks"] and d)
        assert listed["model"] == "by-hand" and listed["model_lacks"] == ["humidity"]
        text = daemon.cli("device", "list").stdout
        assert "! hand-1: the board announces humidity, which its model 'by-hand' lacks" in text
        assert "hand-1 announces humidity, which its model lacks" in daemon.cli("status").stdout
        # and on the gateway's device page, from its API
        info = json.loads((daemon.data_dir / "daemon.json").read_text())
        request = urllib.request.Request(f"http://{info['http']}/api/nodes/local/devices",
                                         headers={"authorization": f"Bearer {daemon.admin()[1]}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert {d["id"]: d for d in json.loads(reply.read())}["hand-1"]["model_lacks"] == ["humidity"]
        daemon.cli("device", "set-model", "hand-1", "board-sht")  # the fix the warning names
        listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}["hand-1"]
        assert listed["model"] == "board-sht" and listed["model_lacks"] == []
    log = (daemon.data_dir.parent / "vdev-hand.log").read_text()
    assert "hand-1 keeps its model 'by-hand' (given by hand)" in log
    # a board rewired: the model of its earlier board file is replaced, not kept as if given by hand
    light = tmp_path / "light.toml"
    light.write_text('[[component]]\ndriver = "bh1750"\n')
    with virtual_boards(daemon, "hand", 1, period=1, extra=("--board", str(light))):
        rows = wait_until(lambda: [r for r in daemon.readings("hand-1") if "illuminance" in r["values"]])
        listed = {d["id"]: d for d in json.loads(daemon.cli("device", "list", "--json").stdout)}["hand-1"]
        assert listed["model"] == "board-light" and rows


def test_home_assistant_gets_each_part_as_the_entity_it_is(tmp_path: Path) -> None:
    from edgetrio.daemon.homeassistant import discovery
    from edgetrio.models import Model

    board_file = tmp_path / "gh.toml"
    board_file.write_text(GREENHOUSE)
    board = load_board(board_file)
    model = Model.from_dict(board.model_document())
    meta = {"model": board.model, "resources": board.resources, "controls": [
        {"name": "period", "type": "float", "unit": "s", "min": 0.1, "max": 86400}]}
    entities = {topic.split("/")[1] + ":" + body["name"]: body for topic, body in discovery("gh-1", model, meta)}
    assert entities["binary_sensor:door"]["device_class"] == "door"
    assert entities["switch:pump"]["command_topic"].endswith("/set/pump")
    assert entities["number:lamp"]["mode"] == "slider" and entities["number:lamp"]["max"] == 100
    assert entities["number:period"]["mode"] == "box"  # 0.1 s to a day: typed, not slid
    assert entities["sensor:air temperature"]["device_class"] == "temperature"
    assert entities["sensor:air temperature"]["unit_of_measurement"] == "°C"
    assert entities["sensor:water"]["unit_of_measurement"] == "L"
    assert entities["sensor:water"]["state_class"] == "total_increasing"  # a meter: Home Assistant sums it
    assert entities["sensor:water rate"]["state_class"] == "measurement"
    assert "sensor:pump" not in entities and "sensor:lamp" not in entities  # outputs are not also sensors


def test_a_meta_whose_parts_are_not_lists_is_taken_as_nothing_known() -> None:
    # what a device announces reaches both tiers unchecked in shape: an attacker's board sends numbers for lists
    from edgetrio.cloud.store import desired_problem
    from edgetrio.daemon.homeassistant import controls_of, discovery
    from edgetrio.models import settings_of

    for meta in ({"controls": 5, "resources": 3}, {"controls": "ab", "resources": {"a": 1}}, [1, 2]):
        assert desired_problem(meta, {"led": True}) is None  # type: ignore[arg-type]
    assert settings_of(None, {"controls": 7}) == {} and controls_of(None, {"controls": 7}) == []
    assert discovery("x", None, {"controls": 7, "resources": 9, "commands": 3}) == []


def test_a_board_file_does_not_replace_a_model_others_rely_on(daemon: Daemon, tmp_path: Path) -> None:
    def flash(device: str, board: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "b.toml").write_text(board)
        return daemon.cli("flash", "--out", str(tmp_path / device), "--device-id", device, "--broker", "h",
                          "--board", str(tmp_path / "b.toml"), check=False)

    hand = tmp_path / "hand.toml"
    hand.write_text('name = "clash-file"\n[[resources]]\nname = "temperature"\ntype = "float"\nunit = "C"\n')
    daemon.cli("model", "add", str(hand))
    refused = flash("clash-1", '[board]\nmodel = "clash-file"\n[[component]]\ndriver = "adc"\npin = 34\n')
    assert refused.returncode == 2 and "'clash-file' was added from a file" in refused.stderr
    assert "temperature" in json.dumps([m for m in json.loads(daemon.cli("model", "list", "--json").stdout)
                                        if m["name"] == "clash-file"])  # left as it was
    sht = '[board]\nmodel = "clash-board"\n[[component]]\ndriver = "sht3x"\n'
    assert flash("clash-1", sht).returncode == 0 and flash("clash-2", sht).returncode == 0  # one file, one model
    light = '[board]\nmodel = "clash-board"\n[[component]]\ndriver = "bh1750"\n'
    refused = flash("clash-2", light)  # rewiring one of two boards under the shared name would break the other
    assert refused.returncode == 2 and "'clash-board' is what clash-1 run with other parts" in refused.stderr
    (tmp_path / "light.toml").write_text(light)  # vdev says so in one line too, and starts no board
    refused = daemon.cli("vdev", "--prefix", "clash", "--board", str(tmp_path / "light.toml"), check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "'clash-board' is what clash-2 run with other parts" in refused.stderr
    daemon.cli("device", "remove", "clash-1")
    assert flash("clash-2", light).returncode == 0  # its only board now: rewired, the model follows


def test_a_fault_pins_only_what_a_room_and_a_board_can_give(tmp_path: Path) -> None:
    """`fault ID env` took values no wiring gives (1e9 degrees, a pin level of 5): refused now, with the range."""
    from edgetrio.tools.vdev import flash_dir, set_fault

    flash_dir(tmp_path, "v-1").mkdir(parents=True)
    for pin, why in ((("temperature", 1e9), "-40 to 85 °C"), (("humidity", -1), "0 to 100 %"),
                     (("gpio13", 5), "0 or 1 (the pin's level)"), (("gpio25_hz", 1e9), "0 to 40000 Hz"),
                     (("temperature", float("nan")), "a number")):
        with pytest.raises(ValueError, match=re.escape(why)):
            set_fault(tmp_path, "v-1", "env", dict([pin]))
    set_fault(tmp_path, "v-1", "env", {"temperature": -5.5, "gpio13": 0, "gpio25_hz": 120})
    assert json.loads((flash_dir(tmp_path, "v-1") / "sim" / "env.json").read_text())["temperature"] == -5.5
