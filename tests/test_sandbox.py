"""The sandbox: each hostile program ends as a failure within seconds, harms nothing, leaves nothing
behind, and the harness goes on. Each hostile program is otherwise correct, so only the sandbox stands
between it and "pass". Tests that let a program loose on the machine (kill(-1) as this user would end
the test run) need root, where each child has a uid of its own."""
import glob
import os
import queue
import tempfile
import time

import pytest

import sandbox
from sandbox import execute, execute_many

OK = 'def f(x):\n    return x + 1\n'
WRONG = 'def f(x):\n    return x\n'
TESTS = 'assert f(1) == 2\nassert f(-3) == -2\n'  # the world's shape: judged from the values f returns
TOKEN_TESTS = "assert f(1) == 2, 'f(1)'\nassert f(-3) == -2, 'f(-3)'\n"  # any other shape: run in the child
POSIX = ("import _imp\nclass Spec:\n    name = 'posix'\nposix = _imp.create_builtin(Spec)  # undoes the guard\n"
         "_imp.exec_builtin(posix)\n")
# up to 64 buffers of memory, each in a file of its own ({make}); f is right only if fewer than 32 could be made
HOARD = (POSIX + 'made = 0\ntry:\n    for i in range(64):\n        {make}\n        made += 1\n'
         'except OSError:  # out of open files\n    pass\ndef f(x):\n    return x + 1 if made < 32 else x\n')
UNREACHED = 'def f(x):\n    return x + 1 if reached == 0 else x\n'  # right only if nothing was reached
only_root = pytest.mark.skipif(os.geteuid() != 0, reason='needs root: a chroot and a uid of its own per child')


def processes():
    """{pid: (parent's pid, uid, whether it runs sandbox.ZYGOTE)} of every process."""
    found = {}
    for status in glob.glob('/proc/[0-9]*/status'):
        try:
            with open(status) as fh:
                fields = dict(line.split(':', 1) for line in fh)
            with open(status.replace('status', 'cmdline'), 'rb') as fh:
                zygote = fh.read().endswith(b'\0-c\0' + sandbox.ZYGOTE.encode() + b'\0')
        except (OSError, ValueError):  # gone meanwhile
            continue
        found[int(fields['Pid'])] = int(fields['PPid']), int(fields['Uid'].split()[0]), zygote
    return found


def zygotes(found):
    return {pid for pid, (ppid, _, zygote) in found.items() if ppid == os.getpid() and zygote}


def stray_processes():
    """Our children and theirs, but the zygotes waiting for a job, and processes under the uids our sandbox
    children get."""
    found = processes()
    ours = zygotes(found) | {os.getpid()}
    return [pid for pid, (ppid, uid, _) in found.items() if pid not in ours and (
        ppid in ours or (uid - sandbox.UID_BASE) // sandbox.SLOTS == os.getpid())]


@pytest.fixture(autouse=True)
def leaves_nothing_behind():
    yield
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f'sandbox-{os.getpid()}-*')), 'a folder was left'
    assert not stray_processes(), 'a process was left'


def run(program, tests=TESTS, timeout=3.0):
    start = time.time()
    result = execute(program, tests, timeout)
    assert time.time() - start < timeout + 3, 'the harness must not hang'
    return result


@pytest.mark.parametrize('tests', [TESTS, TOKEN_TESTS])
def test_correct_program_passes_and_wrong_one_fails(tests):
    assert run(OK, tests) == 'pass' and run(WRONG, tests) == 'fail'


@pytest.mark.parametrize('program', ['def f(x) return x + 1\n', 'def f(x):\n    return x / 0\n',
                                     'def g(x):\n    return x + 1\n', 'assert False\n' + OK, OK + '\0'])
@pytest.mark.parametrize('tests', [TESTS, TOKEN_TESTS])
def test_errors(program, tests):  # syntax error, runtime error, missing function, assert outside the tests, null byte
    assert run(program, tests) == 'error'


def test_values_travel_back_whole():  # every plain type, nested; a tuple is not a list
    value = "[(1, -2.5, 3j), {'k': {b'\\x00', None}, (0,): 'é\\ud800\\n'}, True, set(), -1180591620717411303424]"
    assert run(f'def f(x):\n    return {value}\n', f'assert f(1) == {value}\n') == 'pass'
    assert run('def f(x):\n    return (1, 2)\n', 'assert f(1) == [1, 2]\n') == 'fail'


def test_only_the_worlds_shape_is_judged_from_values():
    from tasks import SPLITS, make_tasks
    assert all(sandbox._calls(t.tests) for split in SPLITS for t in make_tasks(split, 30, 0))
    assert sandbox._calls("assert f('a b', [1, -2]) == {'k': (1.5, None)}\n") == [
        ('f', ('a b', [1, -2]), {'k': (1.5, None)})]
    for tests in (TOKEN_TESTS, 'assert f(x) == 2\n', 'assert f(1) != 2\n', 'assert f(1) == g(2)\n',
                  'assert f(n=1) == 2\n', 'x = 1\n', '', 'assert f(1) ==\n'):
        assert sandbox._calls(tests) is None


@pytest.mark.parametrize('program, expected', [
    ('def f(x):\n    if x == 1:\n        return 0\n    while True:\n        pass\n', 'fail'),  # wrong, then loops
    ('def f(x):\n    if x == 1:\n        return 2\n    raise ValueError\n', 'error'),  # right, then raises
    ('def f(x):\n    return 2 if x == 1 else -2.0\n', 'pass'),  # -2.0 == -2, as the assert has it
    ('class I(int):\n    pass\ndef f(x):\n    return I(x + 1)\n', 'fail'),  # not strictly a plain type
    ('def f(x):\n    return 10 ** 5000\n', 'error'),  # too long to write as a literal
    ('import math, os, re\nfrom collections import Counter\ndef f(x):\n    return math.floor(x) + 1\n', 'pass'),
], ids=['fail_then_loop', 'pass_then_raise', 'equal_float', 'int_subclass', 'huge_int', 'imports'])
def test_values_are_judged_in_order(program, expected):
    assert run(program, timeout=1.0) == expected


FORGERIES = {  # each returns a wrong value, then tries to make its verdict "pass" anyway
    'token_from_main': ('import __main__\n__main__.report("pass")\n__main__.exit_now(0)\n' + WRONG),
    'token_from_a_callers_frame': ('import sys\ndef f(x):\n    frame = sys._getframe(1)\n'
                                   "    while 'report' not in frame.f_globals:\n        frame = frame.f_back\n"
                                   "    frame.f_globals['report']('pass')\n    frame.f_globals['exit_now'](0)\n"),
    'token_by_gc_scan': ('import gc, os\nfor o in gc.get_objects():\n'
                         "    if isinstance(o, dict) and isinstance(o.get('token'), str):\n"
                         "        os.write(1, ('\\n' + o['token'] + ' pass\\n').encode())\n" + POSIX +
                         'posix._exit(0)\n' + WRONG),
    'exec_is_a_no_op': 'import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n' + WRONG,
    'compile_patched': ("import builtins\nreal = builtins.compile\n"
                        "builtins.compile = lambda source, *args: real('pass', *args)\n" + WRONG),
    'always_equal': 'class Equal:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Equal()\n',
}


@pytest.mark.parametrize('program', list(FORGERIES.values()), ids=list(FORGERIES))
def test_forgery_fails_on_the_worlds_tests(program):
    assert run(program) in ('fail', 'error')
    assert run(program, TOKEN_TESTS) == 'pass'  # what the token path cannot stop: why the world's tests avoid it


HOSTILE = {  # {dir}: a directory the test owns, holding the file 'keep'
    'infinite_loop': ('while True:\n    pass\n' + OK, 'timeout'),
    'sleep': ('import time\ntime.sleep(60)\n' + OK, 'timeout'),
    'allocation': ('a = []\nwhile True:\n    a.append(bytearray(10**7))\n' + OK, 'error'),
    'fork': ('import os\nif os.fork() == 0:\n    while True:\n        pass\n' + OK, 'error'),
    'fork_unguarded': (POSIX + 'posix.fork()\n' + OK, 'error'),
    'thread': ('import threading\nthreading.Thread(target=lambda: None).start()\n' + OK, 'error'),
    'subprocess': ("import subprocess\nsubprocess.run(['touch', '{dir}/pwned'])\n" + OK, 'error'),
    'os_system': ("import os\nos.system('touch {dir}/pwned')\n" + OK, 'error'),
    'write_outside': ("open('{dir}/pwned', 'w').write('x')\n" + OK, 'error'),
    'delete': ("import os\nos.remove('{dir}/keep')\n" + OK, 'error'),
    'rmtree': ("import shutil\nshutil.rmtree('{dir}')\n" + OK, 'error'),
    'deep_folders': ("import os\nfor i in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n" + OK, 'error'),
    'kill_the_parent': ('import os\nos.kill(os.getppid(), 9)\n' + OK, 'error'),
    'sys_exit_before_tests': ('import sys\nsys.exit(0)\n' + OK, 'error'),
    'os_exit_before_tests': ('import os\nos._exit(0)\n' + OK, 'error'),
    'exit_inside_tests': ('def f(x):\n    raise SystemExit(0)\n', 'error'),
    'kill_itself': (POSIX + 'posix.kill(posix.getpid(), 9)\n' + OK, 'error'),  # only the wall clock makes a timeout
    'kill_itself_by_cpu_limit': (POSIX + 'posix.kill(posix.getpid(), 24)\n' + OK, 'error'),  # SIGXCPU
    # memory outside the address space, held as long as the child lives: 2400 x 256 KiB once passed
    'memfd': ("import os\nfor i in range(2400):\n    os.write(os.memfd_create('m'), bytes(2**18))\n" + OK, 'error'),
    'memfd_unguarded': (HOARD.format(make="posix.write(posix.memfd_create('m'), bytes(2**18))"), 'pass'),
    'pipes_unguarded': (HOARD.format(make='r, w = posix.pipe(); posix.set_blocking(w, False); '
                                          'posix.write(w, bytes(2**16))'), 'pass'),
    'print_megabytes': ("print('x' * 10**7)\n" + OK, 'error'),
    'print_forever': ("while True:\n    print('x' * 1000)\n" + OK, 'error'),
    'fake_success': ("print('pass')\nprint('OK')\nimport sys\nsys.exit(0)\n" + OK, 'error'),
    # the files a child inherits from its zygote: stdin an empty pipe, not the zygote's jobs; nothing above stderr
    'zygote_files': (POSIX + "reached = len(posix.read(0, 9))  # the zygote's stdin would block\n"
                     "for fd in range(3, 64):\n    try:\n"
                     "        posix.write(fd, bytes([9, 0, 0, 0]) + b'garbage!!')  # a zygote's answer, forged\n"
                     "        reached += 1\n    except OSError:  # not open\n        pass\n" + UNREACHED, 'pass'),
    'fake_success_at_exit': ("import atexit\natexit.register(print, 'pass')\ndef f(x):\n    raise SystemExit(0)\n",
                             'error'),
}
KEEP_AT_IT = ('import time\nfor _ in range(100):\n    try:\n        posix.kill(-1, {signal})\n'
              '    except OSError:  # no one to signal\n        pass\n    time.sleep(0.005)\n')
ROOT_ONLY = {  # unguarded: the guard undone, only the chroot and the uid stand in the way
    'write_outside_low_level': ("import _io\n_io.FileIO('{dir}/pwned', 'w').write(b'x')\n" + OK, 'error'),
    'deep_folders_unguarded': (POSIX + "posix.chmod('.', 0o777)\nfor i in range(1500):\n"
                               "    posix.mkdir('d')\n    posix.chdir('d')\n" + OK, 'error'),
    'fill_the_disk': (POSIX + "for i in range(4000):\n    fd = posix.open(f'{i}', posix.O_WRONLY | "
                      "posix.O_CREAT)\n    posix.write(fd, bytes(2**18))\n" + OK, 'error'),
    'shared_memory_file': (POSIX + "posix.open('/dev/shm/sandbox-pwned', posix.O_WRONLY | posix.O_CREAT)\n" + OK,
                           'error'),
    'kill_the_parent_unguarded': (POSIX + 'posix.kill(posix.getppid(), 9)\n' + OK, 'error'),
    'stop_or_kill_the_zygote': (POSIX + 'reached = 0\nfor signal in (19, 9):\n    try:\n'
                                '        posix.kill(posix.getppid(), signal)\n        reached += 1\n'
                                '    except OSError:  # not ours to signal\n        pass\n' + UNREACHED, 'pass'),
    # at the neighbours as they start and run: kill(-1) reaches every process the sender may signal
    'kill_everyone': (POSIX + KEEP_AT_IT.format(signal=9) + OK, 'pass'),
    'stop_everyone': (POSIX + KEEP_AT_IT.format(signal=19) + OK, 'pass'),
}
CASES = [pytest.param(*case, id=name) for name, case in HOSTILE.items()]
CASES += [pytest.param(*case, id=name, marks=only_root) for name, case in ROOT_ONLY.items()]


@pytest.mark.parametrize('program, expected', CASES)
def test_hostile_program(program, expected, tmp_path):
    (tmp_path / 'keep').write_text('keep')
    timeout = 1.0 if expected == 'timeout' else 3.0  # runaway allocation takes a second to reach its limit
    assert run(program.replace('{dir}', str(tmp_path)), timeout=timeout) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep'] and (tmp_path / 'keep').read_text() == 'keep'
    assert run(OK) == 'pass'  # and the harness goes on


@only_root
def test_hostile_programs_beside_correct_ones_in_execute_many(tmp_path):
    (tmp_path / 'keep').write_text('keep')
    hostile = {**HOSTILE, **ROOT_ONLY}
    jobs = [(program.replace('{dir}', str(tmp_path)), TESTS) for program, _ in hostile.values()]
    jobs += [('import time\ntime.sleep(0.5)\n' + (OK if i % 2 else WRONG), TESTS) for i in range(16)]
    expected = [verdict for _, verdict in hostile.values()] + ['fail', 'pass'] * 8
    assert execute_many(jobs, timeout=3.0, workers=len(jobs)) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep']
    assert execute_many([(OK, TESTS), (WRONG, TESTS)] * 4, workers=8) == ['pass', 'fail'] * 4  # and it goes on


FORGED_LINES = {  # the report line a program forges for the first call, built in the child
    'f_string': "'f\"' + '{a}' * 85000 + '\"'",  # 255 KB: seconds of the parent's CPU in ast.literal_eval
    'deep': "'list:1 ' * 2000",
    'endless_count': "'list:99999999999 int:1'",
}


@pytest.mark.parametrize('line', list(FORGED_LINES.values()), ids=list(FORGED_LINES))
def test_a_forged_report_line_costs_the_parent_nothing(line):
    program = ('import gc, os\nfor o in gc.get_objects():\n'
               "    if isinstance(o, dict) and isinstance(o.get('token'), str):\n"
               f"        os.write(1, ('\\n' + o['token'] + ' 0 ' + {line} + '\\n').encode())\nraise SystemExit\n")
    start = time.process_time()
    assert run(program) == 'fail'
    assert time.process_time() - start < 0.5


TEXTS = {  # program texts that made the judge raise, or stall the parent
    'deep_unary': 'x = ' + '-' * 2989 + '1\n',  # RecursionError building the tree
    'deeper_unary': 'x = ' + '-' * 100_000 + '1\n',  # MemoryError: the parser's own stack
    'blank_lines': '\n' * 20_000 + '(',  # does not parse; the text patterns backtracked over every line
    'f_string': 'f"' + '{a}' * 35_000 + '"\n',  # Python 3.11 parses f-strings in quadratic time: a second
    'surrogate': '\ud800', 'null_byte': '\0',
}


@pytest.mark.parametrize('text', list(TEXTS.values()), ids=list(TEXTS))
def test_the_judge_gives_any_text_a_verdict(text):
    from judge import gold_eval_many
    from tasks import RULES, make_tasks
    start = time.process_time()  # the parent's CPU; the child may take its time to compile
    [judged] = gold_eval_many(make_tasks('train', 1, 0), [text], timeout=1.0)
    assert judged['result'] in ('error', 'timeout') and set(judged['violations']) == set(RULES)
    assert time.process_time() - start < 0.5


@only_root
def test_fails_closed_when_the_child_cannot_drop_root(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, 'UID_BASE', 2**32)  # no such uid: setgid and setuid refuse it
    monkeypatch.setattr(sandbox, '_warned', set())
    assert run(OK) == 'error' and run(OK) == 'error'
    assert capsys.readouterr().err.count('could not drop root') == 1  # said once


@pytest.mark.skipif(os.geteuid() == 0, reason='without root only')
def test_without_root_it_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, '_warned', set())
    assert run(OK) == 'pass' and run(OK) == 'pass'
    assert capsys.readouterr().err.count('not running as root') == 1


@pytest.mark.parametrize('script', [
    '',  # ends at once
    "import os\nos.read(0, 2**20)\nos.write(1, bytes([255]) * 8)\nos.read(0, 1)\n",  # a 4 GB answer
    'import os\nos.read(0, 2**20)\nos.read(0, 1)\n',  # no answer
], ids=['dies', 'answers_too_much', 'never_answers'])
def test_a_zygote_that_fails_makes_an_error_once_and_is_replaced(script, monkeypatch, capsys):
    monkeypatch.setattr(sandbox, '_idle', queue.SimpleQueue())  # a pool of zygotes that run the script
    monkeypatch.setattr(sandbox, 'ZYGOTE', script)
    monkeypatch.setattr(sandbox, 'ANSWER_MARGIN', 0.1)
    monkeypatch.setattr(sandbox, '_warned', set())
    assert run(OK, timeout=0.3) == 'error' and run(OK, timeout=0.3) == 'error'
    assert capsys.readouterr().err.count('a zygote died') == 1
    monkeypatch.undo()
    assert run(OK) == 'pass'


def test_zygotes_are_kept_for_the_next_run():
    assert run(OK) == 'pass'
    waiting = zygotes(processes())
    assert run(WRONG) == 'fail' and run(OK) == 'pass' and zygotes(processes()) == waiting


def test_child_runs_in_an_empty_folder_with_a_clean_environment():
    program = "import os\nassert 'PATH' not in os.environ\nassert os.listdir('.') == []  # the job came on stdin\n"
    assert 'PATH' in os.environ and run(program + OK) == 'pass'


def test_execute_many_keeps_order_and_runs_in_parallel():
    programs = ['import time\ntime.sleep(1)\n' + (OK if i % 2 == 0 else WRONG) for i in range(8)]
    start = time.time()
    assert execute_many([(p, TESTS) for p in programs], workers=8) == ['pass', 'fail'] * 4
    assert time.time() - start < 5  # one after another would take 8 s


def test_many_correct_programs_all_pass_in_order():  # the speed is bench/sandbox.py's business
    jobs = [(f'def f(x):\n    return x + {i % 7}\n', f'assert f(1) == {1 + i % 7}\n') for i in range(60)]
    jobs[17] = (WRONG, 'assert f(1) == 2\n')
    assert execute_many(jobs) == ['pass'] * 17 + ['fail'] + ['pass'] * 42
