from pathlib import Path

from runtime.cpuinfo import cpuinfo_fields


def test_cpuinfo_fields_are_the_first_processors(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    )
    fields = cpuinfo_fields(f)
    assert (fields["vendor_id"], fields["cpu family"], fields["model"]) == ("AuthenticAMD", "25", "1")
    assert fields["model name"] == "AMD EPYC"


def test_cpuinfo_fields_are_empty_without_the_file(tmp_path: Path) -> None:
    assert cpuinfo_fields(tmp_path / "missing") == {}
