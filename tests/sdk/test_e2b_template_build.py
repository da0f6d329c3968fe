"""E2B's own template builder (`Template().from_...().copy().run_cmd()` and `Template.build`) against
Warren, unchanged: file uploads by hash, the build with its logs, failures with their step, images
from a registry with credentials, start and ready commands, then sandboxes of the result."""

import os
import subprocess

import pytest
from e2b import Sandbox, Template, wait_for_file, wait_for_port
from e2b.exceptions import BuildException

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_build_with_copy_run_env_user_and_a_sandbox_of_it(daemon, new_sandbox, tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "hello.txt").write_text("hi from the context\n")
    (tmp_path / "app" / "run.sh").write_text("#!/bin/sh\necho run\n")
    template = (
        Template(file_context_path=str(tmp_path))
        .from_template("base")
        .copy("app/hello.txt", "/home/user/")
        .copy("app", "/opt/app", user="user", mode=0o750)
        .run_cmd("echo built-by-$(whoami) > /home/user/marker")
        .run_cmd("touch /root-made", user="root")
        .set_envs({"GREETING": "hello there"})
        .set_workdir("/home/user")
    )
    logs = []
    info = Template.build(template, "sdk-built", on_build_logs=logs.append)
    assert info.template_id == "sdk-built"
    messages = [str(entry.message) for entry in logs]
    assert any("Uploaded" in m for m in messages), messages
    assert any("RUN echo built-by" in m for m in messages), "the build's steps reach the SDK's log"
    assert Template.exists("sdk-built")
    assert not Template.exists("no-such-template-here")

    sbx = new_sandbox(template="sdk-built")
    assert sbx.files.read("/home/user/hello.txt") == "hi from the context\n"
    # E2B's base runs the build as `user`; a RUN with user="root" as root.
    assert sbx.files.read("/home/user/marker") == "built-by-user\n"
    out = sbx.commands.run("stat -c '%U %a' /root-made /opt/app/run.sh; echo $GREETING; pwd")
    assert out.stdout.splitlines() == ["root 644", "user 750", "hello there", "/home/user"], out.stdout

    # A rebuild while a sandbox runs on the template: new sandboxes get the new image, the
    # running one keeps its own.
    (tmp_path / "app" / "hello.txt").write_text("hi from the second build\n")
    Template.build(template, "sdk-built")
    assert new_sandbox(template="sdk-built").files.read("/home/user/hello.txt") == "hi from the second build\n"
    assert sbx.files.read("/home/user/hello.txt") == "hi from the context\n"
    assert sbx.commands.run("cat /opt/app/run.sh").stdout == "#!/bin/sh\necho run\n"
    sbx.kill()

    # An unchanged rebuild uploads nothing and takes every step from the cache.
    logs.clear()
    Template.build(template, "sdk-built", on_build_logs=logs.append)
    messages = [str(entry.message) for entry in logs]
    assert any("already cached" in m for m in messages), messages


def test_a_failing_step_raises_with_its_message(daemon):
    template = Template().from_template("base").run_cmd("echo fine").run_cmd("echo broken >&2; exit 3")
    with pytest.raises(BuildException) as e:
        Template.build(template, "sdk-broken")
    assert "3" in str(e.value), str(e.value)


def test_bad_definitions_are_refused_clearly(daemon):
    with pytest.raises(BuildException) as e:
        Template.build(Template().from_template("no-such-base").run_cmd("true"), "sdk-nobase")
    assert "no-such-base" in str(e.value)
    with pytest.raises(Exception) as e:
        Template.build(Template().from_template("base").run_cmd("true"), "sdk-badtag", tags=["no spaces"])
    assert "invalid tag" in str(e.value)


def test_tags_name_builds_and_move_between_them(daemon, new_sandbox):
    from e2b import SandboxException

    def reads(template):
        return new_sandbox(template=template).files.read("/home/user/v")

    one = Template().from_template("base").run_cmd("echo one > /home/user/v")
    info = Template.build(one, "sdk-tags:v1", tags=["stable"])
    assert (info.template_id, info.tags) == ("sdk-tags", ["v1", "stable"]), info
    assert reads("sdk-tags:v1") == reads("sdk-tags:stable") == "one\n"
    # No tag given: the build is the template's `default`.
    two = Template().from_template("base").run_cmd("echo two > /home/user/v")
    assert Template.build(two, "sdk-tags").tags == ["default"]
    assert reads("sdk-tags") == reads("sdk-tags:default") == "two\n"
    assert Template.exists("sdk-tags:default")

    # Moving `stable` to the default build: new sandboxes get it, running ones keep theirs.
    on_old_stable = new_sandbox(template="sdk-tags:stable")
    moved = Template.assign_tags("sdk-tags:default", "stable")
    assert moved.tags == ["stable"]
    assert reads("sdk-tags:stable") == "two\n"
    assert on_old_stable.files.read("/home/user/v") == "one\n"
    tags = {t.tag: t for t in Template.get_tags("sdk-tags")}
    assert sorted(tags) == ["default", "stable", "v1"], tags
    assert tags["stable"].build_id == tags["default"].build_id == moved.build_id
    assert tags["v1"].build_id != tags["default"].build_id

    # Removing a tag that a sandbox runs on: the sandbox lives on, new creates of it fail.
    on_v1 = new_sandbox(template="sdk-tags:v1")
    Template.remove_tags("sdk-tags", "v1")
    assert sorted(t.tag for t in Template.get_tags("sdk-tags")) == ["default", "stable"]
    assert on_v1.commands.run("cat /home/user/v").stdout == "one\n"
    with pytest.raises(SandboxException):
        new_sandbox(template="sdk-tags:v1")

    # Bad input answers clearly.
    with pytest.raises(Exception) as e:
        Template.assign_tags("sdk-tags:nope", "x")
    assert "not found" in str(e.value)
    with pytest.raises(Exception) as e:
        Template.assign_tags("sdk-tags", "bad/tag")
    assert "invalid tag" in str(e.value)
    with pytest.raises(Exception) as e:
        Template.remove_tags("sdk-tags", "never")
    assert "no tag never" in str(e.value)
    with pytest.raises(Exception) as e:
        Template.get_tags("no-such-template")
    assert "no tags" in str(e.value)


def test_from_a_registry_image_with_credentials_and_a_start_command(daemon, new_sandbox, registry, tmp_path):
    layout = tmp_path / "layout"
    subprocess.run([os.path.join(ROOT, "tests/images/make-busybox-image.sh"), str(layout), "v1"],
                   check=True, capture_output=True)
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", "alice:s3cret",
                    f"oci:{layout}:v1", f"docker://{registry}/team/busybox:v1"], check=True, capture_output=True)
    template = (
        Template()
        .from_image(f"{registry}/team/busybox:v1", username="alice", password="s3cret")
        .run_cmd("echo from-the-image > /made")
        .set_start_cmd("httpd -f -p 8080 -h /", wait_for_port(8080))
    )
    Template.build(template, "sdk-image")
    sbx = new_sandbox(template="sdk-image")
    assert sbx.files.read("/made") == "from-the-image\n"
    # The start command was serving when the create returned (the ready port was waited for).
    out = sbx.commands.run("wget -q -O - http://127.0.0.1:8080/made")
    assert out.stdout == "from-the-image\n"

    with pytest.raises(BuildException) as e:
        Template.build(Template().from_image(f"{registry}/team/busybox:v1", username="alice", password="wrong"),
                       "sdk-image-denied")
    assert "busybox" in str(e.value)


def test_a_ready_command_holds_the_create_until_it_succeeds(daemon, new_sandbox):
    # The start command gets ready only after a second; the create returns once it is.
    template = (
        Template()
        .from_template("base")
        .set_start_cmd("sleep 1; touch /tmp/ready-flag; sleep 1000", wait_for_file("/tmp/ready-flag"))
    )
    Template.build(template, "sdk-readycmd")
    sbx = new_sandbox(template="sdk-readycmd")
    assert sbx.commands.run("test -f /tmp/ready-flag && echo ready").stdout == "ready\n"


def test_cpu_and_memory_of_the_build_request_go_to_its_sandboxes(daemon, new_sandbox):
    Template.build(Template().from_template("base").run_cmd("true"), "sdk-sized", cpu_count=1, memory_mb=256)
    sbx = new_sandbox(template="sdk-sized")
    # The sandbox's cgroups, seen from the host (v1 hierarchies, else the unified one).
    cg = f"{daemon.cgroup_name}/{sbx.sandbox_id}"
    if os.path.isdir(f"/sys/fs/cgroup/memory/{cg}"):
        limit = open(f"/sys/fs/cgroup/memory/{cg}/memory.limit_in_bytes").read().strip()
        quota = int(open(f"/sys/fs/cgroup/cpu/{cg}/cpu.cfs_quota_us").read())
        period = int(open(f"/sys/fs/cgroup/cpu/{cg}/cpu.cfs_period_us").read())
    else:
        limit = open(f"/sys/fs/cgroup/{cg}/memory.max").read().strip()
        quota, period = map(int, open(f"/sys/fs/cgroup/{cg}/cpu.max").read().split())
    assert limit == str(256 << 20), limit
    assert quota == period, f"one vCPU: {quota}/{period}"
    with pytest.raises(Exception) as e:
        Template.build(Template().from_template("base").run_cmd("true"), "sdk-huge", memory_mb=10**9)
    assert "memoryMB" in str(e.value)
