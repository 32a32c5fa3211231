// granary-verbs-latency: the latency of Granary's one-sided operations over RDMA verbs, measured
// the way perftest measures raw verbs, so the two can be compared line by line (Scripts/bench-verbs).
//
//   granary-verbs-latency [--iterations N] [--warmup N] [--in-process] [--tsv]
//   granary-verbs-latency --peer-address IP:PORT --cluster HEX [--iterations N] [--warmup N] [--tsv]
//   granary-verbs-latency --serve --listen IP:PORT --cluster HEX --directory DIR --until FILE
//
// The last two are the two ends on different hosts (Scripts/bench-verbs --two-hosts): node 1
// serves on its host until FILE exists; node 0 reaches it by address through the RDMA CM and
// measures read, write, cas and faa (no ping-pong: that needs the two to talk back and forth).
//
// Two nodes on one RDMA device: node 0 (this process) and node 1 (a child process running this
// program with --serve, as perftest runs a server and a client; or, with --in-process, a second
// transport in this process with a thread for the ping-pong). Node 0 measures, per operation:
//
//   read 64      VerbsTransport.read of 64 bytes: RDMA READ round trip + copy out of staging
//   write 64     VerbsTransport.write of 64 bytes until its completion (a full round trip: WRITE + ACK)
//   pingpong 64  half of a WRITE ping-pong: node 0 writes 64 bytes to node 1, node 1 sees them in
//                its memory and writes 64 bytes back; this is what perftest's ib_write_lat reports
//   cas 8        VerbsTransport.compareAndSwap (ATOMIC_CMP_AND_SWP round trip)
//   faa 8        VerbsTransport.fetchAndAdd (ATOMIC_FETCH_AND_ADD round trip)
//
// Each figure is over N operations timed one by one after the warm-up: the median ("typical", as
// perftest's t_typical), the mean, the minimum and the 99th percentile; then N more timed as one
// block ("loop mean": no clock read per call). Microseconds. The "clock" line is the cost of the
// timer itself, which the per-call figures include about once (perftest reads the TSC instead).
import GranaryMemory
import GranaryTransport
import GranaryVerbs
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// MARK: Options

struct Options {
    var iterations = 1000
    var warmup = 100
    var inProcess = false
    var tsv = false
    var serve = false
    var directory = ""
    var peerDirectory = ""
    var cluster: UInt64 = 0
    /// Two hosts: node 1's address (measuring side), or where node 1 listens (serving side).
    var peerAddress: String?
    var listen: String?
    var until: String?
}

func fail(_ message: String) -> Never {
    let text = Array("granary-verbs-latency: \(message)\n".utf8)
    _ = text.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(1)
}

func parseOptions() -> Options {
    var options = Options()
    var arguments = CommandLine.arguments.dropFirst()
    func value(_ name: String) -> String {
        guard let next = arguments.popFirst() else { fail("\(name) needs a value") }
        return next
    }
    while let argument = arguments.popFirst() {
        switch argument {
        case "--iterations": options.iterations = Int(value(argument)) ?? 0
        case "--warmup": options.warmup = Int(value(argument)) ?? -1
        case "--in-process": options.inProcess = true
        case "--tsv": options.tsv = true
        case "--serve": options.serve = true
        case "--directory": options.directory = value(argument)
        case "--peer-directory": options.peerDirectory = value(argument)
        case "--cluster": options.cluster = UInt64(value(argument), radix: 16) ?? 0
        case "--peer-address": options.peerAddress = value(argument)
        case "--listen": options.listen = value(argument)
        case "--until": options.until = value(argument)
        case "-h", "--help":
            print("""
                usage: granary-verbs-latency [--iterations N] [--warmup N] [--in-process] [--tsv]

                Measures VerbsTransport's READ 64 B, WRITE 64 B (completion and ping-pong half round trip),
                CAS 8 B and FAA 8 B latency between two nodes on one RDMA device (GRANARY_RDMA_DEVICE,
                GRANARY_RDMA_GID_INDEX). Node 1 is a child process unless --in-process.
                Two hosts: --serve --listen IP:PORT --cluster HEX --directory DIR --until FILE on one,
                --peer-address IP:PORT --cluster HEX on the other (no ping-pong line).
                --tsv prints one line per operation: granary, op, bytes, median, mean, min, p99, loop mean (us).
                """)
            exit(0)
        default: fail("unknown argument '\(argument)' (see --help)")
        }
    }
    guard options.iterations > 0, options.warmup >= 0 else { fail("--iterations must be > 0 and --warmup >= 0") }
    return options
}

// MARK: Nodes

let regionSize = 1 << 20
/// Where node 1 receives ping-pong messages in its region, and node 0 the replies in its own.
let pingOffset: UInt32 = 8192
/// Where node 0's reads, writes and atomics go in node 1's region.
let dataOffset: UInt32 = 65536

/// One node: its directory, its transport and its one data region (r0 on node 0, r1 on node 1).
struct Node {
    let id: NodeID
    let directory: RegionDirectory
    let transport: VerbsTransport
    let region: Region

    init(id: NodeID, directory path: String, cluster: ClusterID, listen: String? = nil) {
        do {
            directory = try RegionDirectory(.init(path))
            var transportOptions = VerbsTransport.Options()
            transportOptions.listenAddress = listen
            transport = try VerbsTransport(localNode: id, cluster: cluster, directory: directory, options: transportOptions)
            region = try directory.openOrCreate(RegionID(id.index), size: regionSize, cluster: cluster)
            try transport.register(region)
        } catch {
            fail("node \(id): \(error)")
        }
        self.id = id
    }
}

/// The word a 64-byte ping-pong message ends with: its sequence number, never zero.
@inline(__always) func pingWord(_ region: Region) -> UnsafeMutablePointer<Atomic<UInt64>> {
    (region.base + Int(pingOffset) + 56).assumingMemoryBound(to: Atomic<UInt64>.self)
}

/// Waits until the last word of the local ping slot holds `sequence` (bounded: 10 s).
@inline(__always) func awaitPing(_ region: Region, _ sequence: UInt64) {
    let word = pingWord(region)
    var spins = 0
    var start: UInt64 = 0
    while word.pointee.load(ordering: .acquiring) != sequence {
        spins &+= 1
        // The clock is slow to read in a TCG guest (an HPET access): look at it rarely.
        if spins & 0xFFFF == 0 {
            let now = monotonicNanoseconds()
            if start == 0 { start = now } else if now - start > 10_000_000_000 {
                fail("ping-pong message \(sequence) did not arrive within 10 s")
            }
        }
    }
}

/// The responder's side of the ping-pong: for each message from `peer`, the same 64 bytes back.
func answerPings(_ node: Node, peer: NodeID, count: Int) {
    let message = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 64)
    defer { message.deallocate() }
    memset(message.baseAddress!, 0x5A, 64)
    let target = GlobalAddress(region: RegionID(peer.index), offset: pingOffset)
    for sequence in 1...UInt64(count) {
        awaitPing(node.region, sequence)
        message.storeBytes(of: sequence, toByteOffset: 56, as: UInt64.self)
        do { try node.transport.write(to: peer, target, from: UnsafeRawBufferPointer(message)) } catch { fail("pong \(sequence): \(error)") }
    }
}

// MARK: Serving (node 1 as a child process)

func serve(_ options: Options) -> Never {
    if let until = options.until {
        // Node 1 on its own host: serve one-sided operations (nothing to run) until told to stop.
        guard let listen = options.listen, options.cluster != 0, !options.directory.isEmpty else {
            fail("--serve --until needs --listen IP:PORT, --cluster HEX and --directory DIR")
        }
        let node = Node(id: NodeID(1), directory: options.directory, cluster: ClusterID(rawValue: options.cluster), listen: listen)
        print("ready \(node.transport.listenAddress)")
        fflush(nil)
        while access(until, F_OK) != 0 { usleep(100_000) }
        exit(0)
    }
    let node = Node(id: NodeID(1), directory: options.directory, cluster: ClusterID(rawValue: options.cluster))
    do {
        node.transport.addPeer(NodeID(0), endpoint: try RegionDirectory(.init(options.peerDirectory), create: false))
    } catch { fail("node 1: \(error)") }
    print("ready", terminator: "\n")
    fflush(nil)
    while let line = readLine() {
        let words = line.split(separator: " ")
        if words.first == "pingpong", words.count == 2, let count = Int(words[1]) {
            answerPings(node, peer: NodeID(0), count: count)
            print("done")
            fflush(nil)
        } else if words.first == "quit" {
            break
        } else {
            fail("node 1: unknown command '\(line)'")
        }
    }
    exit(0)
}

/// Node 1 as a child process, driven over its standard input and output.
final class Child {
    let pid: pid_t
    let input: UnsafeMutablePointer<FILE>
    let output: UnsafeMutablePointer<FILE>

    init(arguments: [String]) {
        var toChild: [Int32] = [0, 0], fromChild: [Int32] = [0, 0]
        guard pipe(&toChild) == 0, pipe(&fromChild) == 0 else { fail("pipe: \(String(cString: strerror(errno)))") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, toChild[0], 0)
        posix_spawn_file_actions_adddup2(&actions, fromChild[1], 1)
        for fd in toChild + fromChild { posix_spawn_file_actions_addclose(&actions, fd) }
        let executable = "/proc/self/exe"
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        var pid: pid_t = 0
        let result = posix_spawn(&pid, executable, &actions, nil, argv, environ)
        posix_spawn_file_actions_destroy(&actions)
        argv.forEach { free($0) }
        guard result == 0 else { fail("posix_spawn: \(String(cString: strerror(result)))") }
        close(toChild[0])
        close(fromChild[1])
        self.pid = pid
        input = fdopen(toChild[1], "w")
        output = fdopen(fromChild[0], "r")
    }

    func send(_ line: String) {
        fputs(line + "\n", input)
        fflush(input)
    }

    func expect(_ wanted: String) {
        var buffer = [CChar](repeating: 0, count: 256)
        guard fgets(&buffer, 256, output) != nil else { fail("node 1 (pid \(pid)) exited before answering '\(wanted)'") }
        let line = cString(buffer).trimmingSuffix()
        guard line == wanted else { fail("node 1 answered '\(line)', expected '\(wanted)'") }
    }

    func finish() {
        send("quit")
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        if status != 0 { fail("node 1 exited with status \(status)") }
    }
}

func cString(_ characters: [CChar]) -> String {
    String(decoding: characters.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

extension String {
    func trimmingSuffix() -> String {
        var copy = self
        while let last = copy.last, last == "\n" || last == "\r" || last == " " { copy.removeLast() }
        return copy
    }
}

// MARK: Measuring

struct Figures {
    let operation: String
    let bytes: Int
    /// Per-operation timings (two clock reads around each call).
    let median: Double
    let mean: Double
    let minimum: Double
    let p99: Double
    /// A second run of `iterations` back-to-back calls timed as a whole: the mean without the cost
    /// of reading the clock per call (which is high in a TCG guest whose clocksource is the HPET).
    let loopMean: Double
    let note: String
}

/// Times `iterations` calls of `body` one by one after `warmup` untimed ones, then `iterations`
/// more as one block. `scale` turns a round trip into what is reported (0.5 for the ping-pong's
/// half round trip). `body` gets a running call number (0, 1, ...).
func measure(_ operation: String, bytes: Int, _ options: Options, scale: Double = 1, note: String,
             _ body: (Int) throws -> Void) -> Figures {
    var samples = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: options.iterations)
    defer { samples.deallocate() }
    var loopNanoseconds: UInt64 = 0
    do {
        for index in 0..<options.warmup { try body(index) }
        for index in 0..<options.iterations {
            let start = monotonicNanoseconds()
            try body(options.warmup + index)
            samples[index] = monotonicNanoseconds() - start
        }
        let first = options.warmup + options.iterations
        let start = monotonicNanoseconds()
        for index in first..<(first + options.iterations) { try body(index) }
        loopNanoseconds = monotonicNanoseconds() - start
    } catch {
        fail("\(operation): \(error)")
    }
    samples.sort()
    let micro = { (nanoseconds: UInt64) in Double(nanoseconds) / 1000 * scale }
    let total = samples.reduce(0.0) { $0 + Double($1) }
    return Figures(operation: operation, bytes: bytes, median: micro(samples[samples.count / 2]),
                   mean: total / Double(samples.count) / 1000 * scale, minimum: micro(samples[0]),
                   p99: micro(samples[min(samples.count - 1, samples.count * 99 / 100)]),
                   loopMean: Double(loopNanoseconds) / Double(options.iterations) / 1000 * scale, note: note)
}

func format(_ value: Double) -> String {
    let hundredths = Int((value * 100).rounded())
    let fraction = hundredths % 100
    return "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction)"
}

func run(_ options: Options) {
    var template = Array("/tmp/granary-verbs-latency-XXXXXX".utf8CString)
    guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else { fail("mkdtemp in /tmp failed") }
    let root = cString(template)
    defer { _ = system("rm -rf '\(root)'") }
    let remote = options.peerAddress
    if remote != nil, options.cluster == 0 { fail("--peer-address needs --cluster HEX (node 1's)") }
    let cluster = remote == nil ? ClusterID.random() : ClusterID(rawValue: options.cluster)
    let node0 = Node(id: NodeID(0), directory: root + "/n0", cluster: cluster)

    var child: Child? = nil
    var node1: Node? = nil
    if let remote {
        node0.transport.addPeer(NodeID(1), address: remote)
    } else if options.inProcess {
        node1 = Node(id: NodeID(1), directory: root + "/n1", cluster: cluster)
        node1!.transport.addPeer(NodeID(0), endpoint: node0.directory)
    } else {
        child = Child(arguments: ["--serve", "--directory", root + "/n1", "--peer-directory", root + "/n0",
                                  "--cluster", String(cluster.rawValue, radix: 16)])
        child!.expect("ready")
    }
    let peer = NodeID(1)
    if remote == nil {
        do {
            node0.transport.addPeer(peer, endpoint: try RegionDirectory(.init(root + "/n1"), create: false))
        } catch { fail("\(error)") }
    }

    let transport = node0.transport
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 64)
    defer { buffer.deallocate() }
    memset(buffer.baseAddress!, 0xA5, 64)
    let data = GlobalAddress(region: RegionID(1), offset: dataOffset)
    let word = GlobalAddress(region: RegionID(1), offset: dataOffset + 4096)
    var results: [Figures] = []

    // What reading the clock around a call costs (the per-call figures include about one read).
    results.append(measure("clock", bytes: 0, options, note: "an empty call: the cost of the timer itself") { _ in })
    results.append(measure("read", bytes: 64, options, note: "full round trip") { _ in
        try transport.read(from: peer, data, into: buffer)
    })
    results.append(measure("write", bytes: 64, options, note: "until its completion: a full round trip") { _ in
        try transport.write(to: peer, data, from: UnsafeRawBufferPointer(buffer))
    })

    // The ping-pong: node 1 answers every message; node 0 times each exchange and reports half.
    // (Not with node 1 on another host: nothing drives its side there.)
    if remote == nil {
        let total = options.warmup + 2 * options.iterations
        let pingTarget = GlobalAddress(region: RegionID(1), offset: pingOffset)
        let responder: pthread_t?
        if let node1 {
            responder = startThread { answerPings(node1, peer: NodeID(0), count: total) }
        } else {
            child!.send("pingpong \(total)")
            responder = nil
        }
        results.append(measure("pingpong", bytes: 64, options, scale: 0.5, note: "half of a write ping-pong round trip, as ib_write_lat") { index in
            let sequence = UInt64(index + 1)
            buffer.storeBytes(of: sequence, toByteOffset: 56, as: UInt64.self)
            try transport.write(to: peer, pingTarget, from: UnsafeRawBufferPointer(buffer))
            awaitPing(node0.region, sequence)
        })
        if let responder { pthread_join(responder, nil) } else { child!.expect("done") }
    }

    var expected: UInt64 = 0
    results.append(measure("cas", bytes: 8, options, note: "full round trip (a swap that succeeds)") { _ in
        let found = try transport.compareAndSwap(at: peer, word, expected: expected, desired: expected &+ 1)
        guard found == expected else { throw TransportError.backend(call: "check", node: peer, detail: "CAS found \(found), expected \(expected)") }
        expected &+= 1
    })
    results.append(measure("faa", bytes: 8, options, note: "full round trip") { _ in
        _ = try transport.fetchAndAdd(at: peer, word, 1)
    })
    child?.finish()

    if options.tsv {
        for figures in results {
            print(["granary", figures.operation, "\(figures.bytes)", format(figures.median), format(figures.mean),
                   format(figures.minimum), format(figures.p99), format(figures.loopMean)].joined(separator: "\t"))
        }
        return
    }
    print("granary-verbs-latency: \(transport.deviceName), GID index \(transport.gidIndex), atomics \(transport.atomicCapability), "
          + "node 1 \(remote.map { "at \($0)" } ?? (options.inProcess ? "in this process" : "in a child process")), \(options.iterations) iterations after \(options.warmup) warm-up")
    print("operation  bytes  median_us  mean_us  min_us  p99_us  loop_mean_us  what")
    for figures in results {
        let columns = [figures.operation.padding(9), "\(figures.bytes)".padding(5), format(figures.median).padding(9),
                       format(figures.mean).padding(7), format(figures.minimum).padding(6), format(figures.p99).padding(6),
                       format(figures.loopMean).padding(12)]
        print(columns.joined(separator: "  ") + "  " + figures.note)
    }
}

extension String {
    func padding(_ width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
}

private final class ThreadBody: @unchecked Sendable {
    // Handed to exactly one pthread, which releases it.
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

func startThread(_ body: @escaping () -> Void) -> pthread_t {
    let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    var thread = pthread_t()
    let result = pthread_create(&thread, nil, { raw in
        Unmanaged<ThreadBody>.fromOpaque(raw!).takeRetainedValue().body()
        return nil
    }, box)
    guard result == 0 else { fail("pthread_create: \(result)") }
    return thread
}

let options = parseOptions()
if options.serve { serve(options) }
run(options)
