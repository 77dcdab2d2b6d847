"""The sandbox: each hostile program ends as a failure within seconds, harms nothing, and the harness
goes on. Each hostile program is otherwise correct, so only the sandbox stands between it and "pass"."""
import glob
import os
import tempfile
import time

import pytest

from sandbox import execute, execute_many

OK = 'def f(x):\n    return x + 1\n'
TESTS = 'assert f(1) == 2\nassert f(-3) == -2\n'


def run(program, timeout=3.0):
    start = time.time()
    result = execute(program, TESTS, timeout)
    assert time.time() - start < timeout + 3, 'the harness must not hang'
    return result


def test_correct_program_passes():
    assert run(OK) == 'pass'


def test_wrong_program_fails():
    assert run('def f(x):\n    return x\n') == 'fail'


@pytest.mark.parametrize('program', ['def f(x) return x + 1\n', 'def f(x):\n    return x / 0\n',
                                     'def g(x):\n    return x + 1\n', 'assert False\n' + OK, OK + '\0'])
def test_errors(program):  # syntax error, runtime error, missing function, assert outside the tests, null byte
    assert run(program) == 'error'


only_root = pytest.mark.skipif(os.getuid() != 0, reason="without root the child can't chroot: the guard alone "
                                                        "blocks open(), not lower-level writes")
HOSTILE = {  # {dir}: a directory the test owns, holding the file 'keep'
    'infinite_loop': ('while True:\n    pass\n' + OK, 'timeout'),
    'sleep': ('import time\ntime.sleep(60)\n' + OK, 'timeout'),
    'allocation': ('a = []\nwhile True:\n    a.append(bytearray(10**7))\n' + OK, 'error'),
    'fork': ('import os\nif os.fork() == 0:\n    while True:\n        pass\n' + OK, 'error'),
    'fork_via_posix': ('import posix\nposix.fork()\n' + OK, 'error'),
    'thread': ('import threading\nthreading.Thread(target=lambda: None).start()\n' + OK, 'error'),
    'subprocess': ("import subprocess\nsubprocess.run(['touch', '{dir}/pwned'])\n" + OK, 'error'),
    'os_system': ("import os\nos.system('touch {dir}/pwned')\n" + OK, 'error'),
    'write_outside': ("open('{dir}/pwned', 'w').write('x')\n" + OK, 'error'),
    'write_outside_low_level': pytest.param("import _io\n_io.FileIO('{dir}/pwned', 'w').write(b'x')\n" + OK,
                                            'error', marks=only_root),
    'delete': ("import os\nos.remove('{dir}/keep')\n" + OK, 'error'),
    'rmtree': ("import shutil\nshutil.rmtree('{dir}')\n" + OK, 'error'),
    'kill_the_parent': ('import os\nos.kill(os.getppid(), 9)\n' + OK, 'error'),
    'sys_exit_before_tests': ('import sys\nsys.exit(0)\n' + OK, 'error'),
    'os_exit_before_tests': ('import os\nos._exit(0)\n' + OK, 'error'),
    'exit_inside_tests': ('def f(x):\n    raise SystemExit(0)\n', 'error'),
    'print_megabytes': ("print('x' * 10**7)\n" + OK, 'error'),
    'print_forever': ("while True:\n    print('x' * 1000)\n" + OK, 'error'),
    'fake_success': ("print('pass')\nprint('OK')\nimport sys\nsys.exit(0)\n" + OK, 'error'),
    'fake_success_at_exit': ("import atexit\natexit.register(print, 'pass')\ndef f(x):\n    raise SystemExit(0)\n",
                             'error'),
}


@pytest.mark.parametrize('program, expected', list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_program(program, expected, tmp_path):
    (tmp_path / 'keep').write_text('keep')
    assert run(program.replace('{dir}', str(tmp_path))) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep'] and (tmp_path / 'keep').read_text() == 'keep'
    assert run(OK) == 'pass'  # and the harness goes on


def test_child_runs_in_a_fresh_scratch_dir_with_a_clean_environment():
    scratch_dirs = os.path.join(tempfile.gettempdir(), 'sandbox-*')
    before = set(glob.glob(scratch_dirs))
    program = "import os\nassert 'PATH' not in os.environ\nassert os.listdir('.') == []  # the job file is gone\n"
    assert 'PATH' in os.environ and run(program + OK) == 'pass'
    assert set(glob.glob(scratch_dirs)) <= before  # and the scratch dir is removed afterwards


def test_execute_many_keeps_order_and_runs_in_parallel():
    wrong = 'def f(x):\n    return x\n'
    programs = ['import time\ntime.sleep(1)\n' + (OK if i % 2 == 0 else wrong) for i in range(8)]
    start = time.time()
    assert execute_many([(p, TESTS) for p in programs], workers=8) == ['pass', 'fail'] * 4
    assert time.time() - start < 5  # one after another would take 8 s


def test_many_correct_programs_all_pass_in_order():  # the speed is bench/sandbox.py's business
    jobs = [(f'def f(x):\n    return x + {i % 7}\n', f'assert f(1) == {1 + i % 7}\n') for i in range(60)]
    jobs[17] = ('def f(x):\n    return x\n', 'assert f(1) == 2\n')
    assert execute_many(jobs) == ['pass'] * 17 + ['fail'] + ['pass'] * 42
