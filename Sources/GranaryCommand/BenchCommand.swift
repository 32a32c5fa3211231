import ArgumentParser
import Foundation
import Granary
import GranaryVerbs
import GranaryZooKeeper
import GranaryWorkloads

/// `granary bench`: transaction throughput on an embedded cluster, no set-up needed.
struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure transaction throughput on an embedded cluster.",
        discussion: """
            Workloads: tatp (FaRM's headline workload), smallbank, transfer (2 reads + 2 writes). \
            Default: an embedded 3-node cluster, 3 replicas, shared-memory transport, 5 seconds. \
            Prints a live progress line, then a table; --json and --plot write the figures.
            """,
        subcommands: [TATPBench.self, SmallBankBench.self, TransferBench.self, MembershipBench.self]
    )
}

/// Options every workload shares.
struct BenchOptions: ParsableArguments {
    @Option(help: "Run against the node processes of this cluster file (granary cluster up) as one of its clients (granary cluster init --clients), instead of an embedded cluster.")
    var cluster: String?
    @Option(help: "With --cluster: the client member to be (default: the first one not in use).") var client: Int?
    @Option(help: "With --cluster: the nodes run the configuration manager through this ZooKeeper (zookeeper://host:port, as given to `cluster up --coordination`; default: the cluster file's \"coordination\"); the client joins the configuration and follows it.")
    var coordination: String?
    @Option(help: "Nodes in the embedded cluster.") var nodes: Int = 3
    @Option(help: "Replicas of every region (primary + backups), at most --nodes.") var replicas: Int = 3
    @Option(help: "Worker threads issuing transactions, spread over the nodes.") var workers: Int = 2
    @Flag(inversion: .prefixedNo,
          help: "Measure, every 250 ms, whether all workers or one commit more, and run that many (where the host places the two CPUs far apart, one core can beat two).")
    var adaptiveWorkers = true
    @Option(help: "Measured seconds.") var seconds: Double = 5
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Option(help: "Transport: shm (benchmarks run embedded clusters, on shared memory).") var transport: TransportChoice = .shm
    @Option(help: "Region size in MiB.") var regionMib: Int = 64
    @Option(help: "Bytes of each message ring (one per sender in every node's mailbox: its log), in KiB; a power of two.") var ringKib: Int = ClusterOptions().ringCapacity >> 10
    @Option(help: "Transactions a coordinator's thread gathers per node before it sends them one TRUNCATE record (EngineOptions.truncationBatch).") var truncationBatch: Int = EngineOptions().truncationBatch
    @Option(help: "Write the figures and the configuration as JSON to this file.") var json: String?
    @Option(help: "Write an SVG plot (throughput over time, latency by percentile to 99.99%) to this file.") var plot: String?
    @Option(help: "Write the latency distribution as CSV (percentile,latency_ns: every percent to 99, every 0.1 to 99.9, every 0.01 to 99.99, then 100) to this file.")
    var latencyCsv: String?
    @Flag(help: "No live progress line.") var quiet = false
    @Flag(help: "Run the configuration manager too (over the embedded store; --lease-ms).") var membership = false
    @Option(help: "With the configuration manager: the lease, in milliseconds.") var leaseMs: Int = 10
    @Option(help: "With the configuration manager: lease expiries in a row before a silent member is suspected (MembershipOptions.probeLeases + 1).")
    var expiriesToSuspect: Int = MembershipOptions().probeLeases + 1
    @Option(help: "With the configuration manager: data recovery's pace, in milliseconds (MembershipOptions.copyPace: after each 64 KiB slab a new backup copies, a random wait of up to twice the longer of this and 19 times the slab's work).")
    var copyPaceMs: Double = Double(MembershipOptions().copyPace.wholeNanoseconds) / 1e6

    @Option(help: "With the configuration manager: spare region files each node keeps ready for replicas placed on it while it serves (MembershipOptions.spareRegions; 0: new replicas are sparse files).")
    var spareRegions: Int = MembershipOptions().spareRegions
    @Flag(help: "With the configuration manager: do not excuse a member's silence while one of this host's CPUs was paused (MembershipOptions.excusesHostPauses off), to see what the excuse saves.")
    var noHostPauseExcuse = false
    @Option(help: "Crash this node (as SIGKILL would) during the run; implies --membership. Prints the times from the crash to the new configuration, to every region active, and to 80% of the throughput before.")
    var crash: Int?
    @Option(help: "Seconds into the run at which --crash crashes its node.") var at: Double = 1
    @Option(help: "With --crash: write the commits of every millisecond as CSV (ms,committed) to this file.") var bins: String?
    @Flag(help: "Scaling mode: load once, then run 1, 2, 4, ... workers up to --max-workers (each for --seconds, every worker kept), and print committed/s per worker count; --json and --plot write the curve.")
    var scaling = false
    @Option(help: "With --scaling: the most workers (default: this machine's core count).") var maxWorkers: Int?

    /// The worker counts a scaling run measures: powers of two, and the maximum itself.
    var scalingCounts: [Int] {
        let top = maxWorkers ?? ProcessInfo.processInfo.activeProcessorCount
        var counts: [Int] = []
        var count = 1
        while count < top { counts.append(count); count *= 2 }
        return counts + [top]
    }

    func validate() throws {
        guard nodes >= 1, nodes <= NodeID.limit else { throw ValidationError("--nodes must be in 1...\(NodeID.limit)") }
        guard replicas >= 1, replicas <= nodes else { throw ValidationError("--replicas must be in 1...--nodes (\(nodes))") }
        guard workers >= 1 else { throw ValidationError("--workers must be at least 1") }
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
        guard transport == .shm else { throw ValidationError("--transport \(transport) is not available for benchmarks; use shm") }
        guard regionMib >= 1, regionMib & (regionMib - 1) == 0 else { throw ValidationError("--region-mib must be a power of two") }
        if let crash {
            guard crash >= 0, crash < nodes else { throw ValidationError("--crash must name a node in 0..<--nodes (\(nodes))") }
            guard nodes >= 2, replicas >= 2 else { throw ValidationError("--crash needs at least 2 nodes and 2 replicas, so that every region survives") }
            guard at > 0, at < seconds else { throw ValidationError("--at must be inside the run (0 < --at < --seconds)") }
        }
        if cluster != nil {
            guard crash == nil, !membership else { throw ValidationError("--crash and --membership run an embedded cluster; they do not go with --cluster") }
        } else if client != nil {
            throw ValidationError("--client goes with --cluster")
        }
        if let coordination {
            guard cluster != nil else { throw ValidationError("--coordination goes with --cluster") }
            guard case .zookeeper? = CoordinationChoice(coordination) else {
                throw ValidationError("--coordination takes zookeeper://host:port, got '\(coordination)'")
            }
        }
        if let client, client < 0 || client >= NodeID.limit { throw ValidationError("--client must be a node id in 0..<\(NodeID.limit)") }
        if scaling {
            guard crash == nil else { throw ValidationError("--scaling and --crash do not go together") }
            if let maxWorkers, maxWorkers < 1 || maxWorkers > 1024 { throw ValidationError("--max-workers must be in 1...1024") }
        }
        guard copyPaceMs >= 0 else { throw ValidationError("--copy-pace-ms must not be negative") }
        guard (0...64).contains(spareRegions) else { throw ValidationError("--spare-regions must be in 0...64, got \(spareRegions)") }
        guard leaseMs >= 1, expiriesToSuspect >= 1 else { throw ValidationError("--lease-ms and --expiries-to-suspect must be at least 1") }
        if let plot, !plot.hasSuffix(".svg") { throw ValidationError("--plot writes SVG: give a file name ending in .svg, got '\(plot)'") }
    }

    func makeCluster() async throws -> Cluster {
        if let cluster {
            var options = ClusterOptions()
            options.engine.maximumAttempts = 1_000
            if let coordination, let choice = CoordinationChoice(coordination) {
                options.coordination = choice
                var membership = MembershipOptions()
                membership.lease = .milliseconds(leaseMs)
                options.membership = membership
            }
            return try await Cluster.connect(file: FilePath(cluster), client: client.map { NodeID($0) }, options: options)
        }
        var options = ClusterOptions()
        options.regionSize = regionMib << 20
        options.ringCapacity = ringKib << 10
        options.engine.truncationBatch = truncationBatch
        options.engine.maximumAttempts = 1_000
        if membership || crash != nil {
            var membership = MembershipOptions()
            membership.lease = .milliseconds(leaseMs)
            membership.probeLeases = expiriesToSuspect - 1
            membership.copyPace = .nanoseconds(Int64(copyPaceMs * 1e6))
            membership.spareRegions = spareRegions
            membership.excusesHostPauses = !noHostPauseExcuse
            options.membership = membership
        }
        return try await Cluster.local(nodes: nodes, replicas: replicas, options: options)
    }
}

/// Runs a workload end to end: load, run with progress, check, report.
func runBenchmark(_ name: String, _ workload: inout some Workload, _ options: BenchOptions,
                  parameters: [String: String] = [:]) async throws {
    let startTime = Date()
    let cluster = try await options.makeCluster()
    do {
        try await runBenchmark(name, &workload, options, parameters: parameters, on: cluster, startTime: startTime)
    } catch {
        // A run that failed (a load that could not finish, an invariant that does not hold)
        // leaves no temporary cluster behind: its region files are memory in /dev/shm (seen:
        // 24 GiB of them after a series of failed runs, and the machine out of memory).
        cluster.abandon()
        throw error
    }
}

private func runBenchmark(_ name: String, _ workload: inout some Workload, _ options: BenchOptions,
                          parameters: [String: String], on cluster: Cluster, startTime: Date) async throws {
    let manager = options.membership || options.crash != nil ? "configuration manager with \(options.leaseMs) ms leases, suspicion after \(options.expiriesToSuspect) (embedded store)" : "static configuration"
    if let file = options.cluster {
        let configuration = cluster.configuration
        let nodes = configuration.members.count - configuration.clients.count
        FileHandle.standardError.write("loading \(name) into the \(nodes) node processes of \(file) (\(configuration.regions.count) regions) as client \(cluster.nodes[0].id)...\n".data(using: .utf8)!)
    } else {
        FileHandle.standardError.write("loading \(name) into \(options.nodes) nodes, \(options.replicas) replicas, \(manager)...\n".data(using: .utf8)!)
    }
    // The engines' configurations: with a configuration manager, the cluster's own is the first.
    func regionCount() -> Int { cluster.nodes.map { $0.engine.configuration.regions.count }.max() ?? 0 }
    let regionsBefore = regionCount()
    let loadStart = ContinuousClock.now
    try await workload.load(into: cluster)
    let added = regionCount() - regionsBefore
    if options.scaling {
        FileHandle.standardError.write("loaded in \(ContinuousClock.now - loadStart)\(added > 0 ? " (\(added) regions added on demand)" : ""); scaling over \(options.scalingCounts) workers\n".data(using: .utf8)!)
        try await runScaling(name, workload, on: cluster, options, parameters: parameters, startTime: startTime)
        return
    }
    FileHandle.standardError.write("loaded in \(ContinuousClock.now - loadStart)\(added > 0 ? " (\(added) regions added on demand)" : ""); running \(options.workers) workers for \(options.seconds) s\n".data(using: .utf8)!)
    // Members, not configuration ids: regions added on demand during the run change the id too.
    let membersBefore = cluster.nodes.map { $0.engine.configuration.members.map(\.node) }
    let quiet = options.quiet
    let probe = MemoryLatencyProbe()
    let latencyBefore = probe.measure()
    let handoffBefore = CoreToCoreProbe.measure()
    if options.crash != nil {
        // Leases are renewed by every node before the clock starts: the CM holds a starting
        // member to a grace period, not to its lease, until it has seen it renew.
        let manager = cluster.membership.first(where: \.isManager)
        let deadline = ContinuousClock.now + .seconds(10)
        for member in cluster.nodes where member.id != manager?.node {
            while manager.map({ !$0.hasSeenRenewing(member.id) }) ?? false {
                if let manager, case let configuration = cluster.nodes[manager.node.index].engine.configuration,
                   !configuration.contains(member.id) {
                    throw CommandFailure("\(member.id) was removed from the configuration before the run (\(configuration)): a false suspicion while loading, most likely its lease thread starved; no crash to measure")
                }
                guard ContinuousClock.now < deadline else {
                    throw CommandFailure("the configuration manager has not seen \(member.id) renew its lease within 10 s of loading")
                }
                try await Task.sleep(for: .milliseconds(2))
            }
        }
    }
    let report = Runner.run(workload, on: cluster, workers: options.workers, adaptive: options.adaptiveWorkers,
                            seconds: options.seconds, seed: options.seed,
                            crash: options.crash.map { Runner.CrashPlan(node: NodeID($0), at: options.at) }) { line in
        if !quiet { FileHandle.standardError.write(("\r" + line).data(using: .utf8)!) }
    }
    if !quiet { FileHandle.standardError.write("\n".data(using: .utf8)!) }
    let latencyAfter = probe.measure()
    let handoffAfter = CoreToCoreProbe.measure()
    let membersAfter = cluster.nodes.map { $0.engine.configuration.members.map(\.node) }
    if let crash = options.crash {
        print(CrashFigures(report: report, cluster: cluster, crashed: NodeID(crash)).summary)
        print("  new replicas         \(cluster.spareRegionCounts.taken) made from spare region files")
        if let bins = options.bins, let counts = report.millisecondBins {
            let csv = "ms,committed\n" + counts.enumerated().map { "\($0.offset),\($0.element)" }.joined(separator: "\n") + "\n"
            try csv.write(toFile: bins, atomically: true, encoding: .utf8)
            print("wrote \(bins)")
        }
    } else if membersAfter != membersBefore {
        // A node was suspected and removed during the run (its lease thread starved?): the figures
        // are not those of the configuration the run started with.
        print("warning: the members changed during the run (\(membersBefore) -> \(membersAfter))")
    }
    try await cluster.quiesce()
    let violations = try await workload.check(cluster, committedDelta: report.committedDelta, inDoubt: report.inDoubtDeltas)
    var shown = options
    if options.cluster != nil {
        // The table's shape line describes the cluster connected to, not the embedded defaults.
        shown.nodes = cluster.configuration.members.count - cluster.configuration.clients.count
        shown.replicas = cluster.configuration.replication ?? cluster.configuration.regions.first?.replicas.count ?? 0
        // And its transport (the --transport option is the embedded cluster's): verbs if its
        // members' endpoints are.
        let verbs = cluster.configuration.members.contains { MemberEndpoint($0.endpoint)?.isVerbs == true }
        shown.transport = verbs ? .verbs : .shm
    }
    print(BenchTable.render(name: name, report: report, options: shown))
    print(String(format: "  machine              core-to-core handoff %.0f ns before the run, %.0f ns after; memory latency %.0f / %.0f ns",
                 handoffBefore, handoffAfter, latencyBefore, latencyAfter))
    if let json = options.json {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let document = BenchDocument(workload: name, nodes: shown.nodes, replicas: shown.replicas, workers: options.workers,
                                     seconds: options.seconds, seed: options.seed, transport: shown.transport.rawValue, report: report,
                                     invariantViolations: violations,
                                     memoryLatencyNanoseconds: ["before": latencyBefore, "after": latencyAfter],
                                     coreToCoreNanoseconds: ["before": handoffBefore, "after": handoffAfter],
                                     run: RunFacts(options: options, workloadParameters: parameters, startTime: startTime))
        try encoder.encode(document).write(to: URL(fileURLWithPath: json))
        print("wrote \(json)")
    }
    if let csv = options.latencyCsv {
        let rows = report.latencyCDF.map { String(format: "%.2f,%.0f", $0[1] * 100, $0[0]) }
        try ("percentile,latency_ns\n" + rows.joined(separator: "\n") + "\n").write(toFile: csv, atomically: true, encoding: .utf8)
        print("wrote \(csv)")
    }
    if let plot = options.plot {
        let title = "Granary \(name): \(options.nodes) nodes, \(options.replicas) replicas, \(BenchTable.workers(options, report)), \(String(format: "%.0f", report.committedPerSecond)) committed/s"
        try BenchPlot.svg(title: title, report: report).write(toFile: plot, atomically: true, encoding: .utf8)
        print("wrote \(plot)")
    }
    try await cluster.shutdown()
    if !violations.isEmpty {
        throw CommandFailure("the \(name) invariant does not hold after the run: \(violations.joined(separator: "; "))")
    }
    print(report.inDoubtDeltas.isEmpty ? "invariant: holds"
          : "invariant: holds (\(report.inDoubtDeltas.count) transactions in doubt, whose coordinator crashed or could not tell: the data may show any of them)")
}

struct BenchDocument: Codable {
    var workload: String
    var nodes: Int
    var replicas: Int
    var workers: Int
    var seconds: Double
    var seed: UInt64
    var transport: String
    var report: RunReport
    var invariantViolations: [String]
    /// The machine's memory latency before and after the run (see `MemoryLatencyProbe`).
    var memoryLatencyNanoseconds: [String: Double]
    /// One-way cache-line handoff between two threads before and after the run (see `CoreToCoreProbe`).
    var coreToCoreNanoseconds: [String: Double]
    var run: RunFacts
}

/// What a benchmark document says about its run, besides the figures.
struct RunFacts: Codable {
    /// Every option of the run, the workload's own included (scale, accounts, ...), as given.
    var parameters: [String: String]
    var version: String
    var host: HostFacts
    /// When the run started (ISO 8601, UTC).
    var startTime: String

    init(options: BenchOptions, workloadParameters: [String: String], startTime: Date) {
        parameters = options.parameters.merging(workloadParameters) { _, workload in workload }
        version = GranaryVersion.string
        host = HostFacts.current
        self.startTime = ISO8601DateFormatter().string(from: startTime)
    }
}

/// The machine a benchmark ran on.
struct HostFacts: Codable {
    var cores: Int
    var cpu: String
    var kernel: String
    var memoryBytes: UInt64

    static var current: HostFacts {
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let model = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }
            .map { $0.split(separator: ":", maxSplits: 1).last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "" } ?? "unknown"
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        return HostFacts(cores: ProcessInfo.processInfo.activeProcessorCount, cpu: model, kernel: "Linux \(release)",
                         memoryBytes: ProcessInfo.processInfo.physicalMemory)
    }
}

extension BenchOptions {
    /// The shared options as given, for the JSON.
    var parameters: [String: String] {
        var all = ["nodes": "\(nodes)", "replicas": "\(replicas)", "workers": "\(workers)",
                   "adaptiveWorkers": "\(adaptiveWorkers)", "seconds": "\(seconds)", "seed": "\(seed)",
                   "transport": transport.rawValue, "regionMib": "\(regionMib)", "membership": "\(membership || crash != nil)"]
        if membership || crash != nil {
            all["leaseMs"] = "\(leaseMs)"
            all["expiriesToSuspect"] = "\(expiriesToSuspect)"
            all["copyPaceMs"] = "\(copyPaceMs)"
            all["spareRegions"] = "\(spareRegions)"
            all["excusesHostPauses"] = "\(!noHostPauseExcuse)"
        }
        if let crash { all["crash"] = "\(crash)"; all["at"] = "\(at)" }
        if scaling { all["scalingCounts"] = scalingCounts.map(String.init).joined(separator: ",") }
        return all
    }
}

enum BenchTable {
    /// "2 workers", or "2 workers (adaptive)" when the runner chose how many ran.
    static func workers(_ options: BenchOptions, _ report: RunReport) -> String {
        "\(options.workers) workers" + (report.adaptiveWorkers ? " (adaptive)" : "")
    }

    static func pad(_ text: String, _ width: Int) -> String { text + String(repeating: " ", count: max(0, width - text.count)) }

    static func render(name: String, report: RunReport, options: BenchOptions) -> String {
        func micro(_ ns: UInt64?) -> String { String(format: "%.1f us", Double(ns ?? 0) / 1000) }
        var lines: [String] = []
        lines.append("\(name): \(options.nodes) nodes, \(options.replicas) replicas, \(BenchTable.workers(options, report)), \(options.transport), \(String(format: "%.1f", report.seconds)) s")
        lines.append(String(format: "  committed            %12d  (%.0f/s)", report.committed, report.committedPerSecond))
        for type in report.byType where report.byType.count > 1 {
            let latency = type.latencyNanoseconds.map {
                String(format: "  p50 %.1f us  p99 %.1f us", Double($0["p50"] ?? 0) / 1000, Double($0["p99"] ?? 0) / 1000)
            } ?? ""
            lines.append("    " + pad(type.name, 24) + String(format: " %10d  (%9.0f/s)  found %5.1f%%", type.committed, type.perSecond,
                                type.committed > 0 ? 100 * Double(type.succeeded) / Double(type.committed) : 0) + latency)
        }
        if report.failed > 0 { lines.append(String(format: "  gave up               %12d  (attempt limit or error)", report.failed)) }
        lines.append(String(format: "  abort rate           %11.2f%%  (%d aborted attempts)", report.abortRate * 100, report.aborts.values.reduce(0, +)))
        for (cause, count) in report.aborts.sorted(by: { $0.key < $1.key }) {
            lines.append("    " + pad(cause, 24) + String(format: " %10d", count))
        }
        lines.append("  latency              p50 \(micro(report.latencyNanoseconds["p50"]))  p90 \(micro(report.latencyNanoseconds["p90"]))  p99 \(micro(report.latencyNanoseconds["p99"]))  p99.9 \(micro(report.latencyNanoseconds["p99.9"]))")
        let phases = Phase.allCases.compactMap { phase in
            report.phaseMeanNanoseconds[phase.description].map { "\(phase) \(String(format: "%.1f", $0 / 1000)) us" }
        }
        lines.append("  phases (mean)        " + phases.joined(separator: "  "))
        if report.adaptiveWorkers, !report.activeWorkers.isEmpty {
            let one = report.activeWorkers.filter { $0 == 1 }.count
            lines.append("  workers              \(report.workers) in \(report.activeWorkers.count - one) of \(report.activeWorkers.count) intervals, 1 in \(one)"
                         + " (measured choice; --no-adaptive-workers keeps all \(report.workers))")
        }
        return lines.joined(separator: "\n")
    }
}

struct TransferBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "transfer",
                                                    abstract: "2 reads + 2 writes between random accounts (the engine benchmark).")
    @OptionGroup var options: BenchOptions
    @Option(help: "Accounts.") var accounts: Int = 100_000

    func run() async throws {
        var workload = TransferWorkload(accounts: accounts)
        try await runBenchmark("transfer", &workload, options, parameters: ["accounts": "\(accounts)"])
    }
}

struct TATPBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "tatp", abstract: "TATP: 7 transactions, 80% read-only, NURand keys.")
    @OptionGroup var options: BenchOptions
    @Option(help: "Scale: 100,000 x scale subscribers (fractions allowed).") var scale: Double = 1

    func validate() throws {
        guard scale > 0, scale <= 100 else { throw ValidationError("--scale must be in (0, 100], got \(scale)") }
    }

    func run() async throws {
        var workload = TATPWorkload(scale: scale, seed: options.seed)
        try await runBenchmark("tatp", &workload, options, parameters: ["scale": "\(scale)", "subscribers": "\(Int(100_000 * scale))"])
    }
}

struct SmallBankBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "smallbank", abstract: "SmallBank: 6 transactions, 90% on 4,000 hot accounts.")
    @OptionGroup var options: BenchOptions
    @Option(help: "Accounts.") var accounts: Int = 100_000
    @Option(help: "Hot accounts (90% of transactions pick among them).") var hotAccounts: Int = 4_000
    @Option(help: "Run only these transaction types, comma-separated (e.g. SEND_PAYMENT,AMALGAMATE).") var only: String?

    func validate() throws {
        guard accounts >= 2 else { throw ValidationError("--accounts must be at least 2") }
        guard hotAccounts >= 2, hotAccounts <= accounts else { throw ValidationError("--hot-accounts must be in 2...--accounts") }
        if let only {
            for name in only.split(separator: ",") where !SmallBankWorkload.types.contains(name.uppercased()) {
                throw ValidationError("unknown SmallBank transaction '\(name)'; types: \(SmallBankWorkload.types.joined(separator: ", "))")
            }
        }
    }

    func run() async throws {
        let types = only.map { $0.split(separator: ",").map { SmallBankWorkload.types.firstIndex(of: $0.uppercased())! } }
        var workload = SmallBankWorkload(accounts: accounts, hotAccounts: hotAccounts, seed: options.seed, only: types)
        try await runBenchmark("smallbank", &workload, options,
                               parameters: ["accounts": "\(accounts)", "hotAccounts": "\(hotAccounts)", "only": only ?? "all"])
    }
}

/// `granary bench membership`: time from a node's death to the committed configuration without it.
struct MembershipBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "membership",
        abstract: "Failure detection and reconfiguration time, over many trials.",
        discussion: """
            Each trial starts an embedded 3-node cluster running the configuration manager, waits for \
            the CM, then stops a non-CM node's lease thread (a node that hangs or dies) and measures \
            until the coordination store holds a configuration without it.
            """)
    @Option(help: "Trials.") var trials: Int = 20
    @Option(help: "Lease in milliseconds.") var leaseMs: Int = 10
    @Option(help: "Coordination store: embedded or zookeeper://host:port.") var coordination: String = "embedded"
    @Option(help: "Write the figures as JSON to this file.") var json: String?

    func validate() throws {
        guard trials >= 1 else { throw ValidationError("--trials must be at least 1") }
        guard leaseMs >= 1 else { throw ValidationError("--lease-ms must be at least 1") }
        guard CoordinationChoice(coordination) != nil else {
            throw ValidationError("--coordination takes embedded or zookeeper://host:port, got '\(coordination)'")
        }
    }

    func run() async throws {
        let choice = CoordinationChoice(coordination)!
        var samples: [Double] = []
        for trial in 0..<trials {
            var options = ClusterOptions()
            options.regionSize = 1 << 20
            options.ringCapacity = 16 << 10
            options.coordination = choice
            var membership = MembershipOptions()
            membership.lease = .milliseconds(leaseMs)
            options.membership = membership
            options.logger.logLevel = .warning
            let cluster = try await Cluster.local(nodes: 3, replicas: 3, options: options)
            let store: any CoordinationStore
            switch choice {
            case .embedded: store = cluster.coordination!.session()
            case .zookeeper(let address): store = try ZooKeeperStore(connectString: address)
            }
            let clock = ContinuousClock()
            var deadline = clock.now + .seconds(30)
            while !cluster.membership.contains(where: \.isManager) {
                guard clock.now < deadline else { throw CommandFailure("trial \(trial): no configuration manager within 30 s") }
                try await Task.sleep(for: .milliseconds(1))
            }
            // Let leases settle before the failure.
            try await Task.sleep(for: .milliseconds(Int64(leaseMs * 5)))
            let victim = cluster.membership.first { !$0.isManager }!
            let start = clock.now
            victim.haltLeases()
            deadline = clock.now + .seconds(30)
            while try await ConfigurationRecord.read(cluster.configuration.cluster, from: store).0.contains(victim.node) {
                guard clock.now < deadline else { throw CommandFailure("trial \(trial): \(victim.node) not removed within 30 s") }
                try await Task.sleep(for: .microseconds(200))
            }
            let elapsed = clock.now - start
            samples.append(Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15)
            await store.close()
            try await cluster.shutdown()
            FileHandle.standardError.write(String(format: "\rtrial %d/%d: %.1f ms", trial + 1, trials, samples.last!).data(using: .utf8)!)
        }
        FileHandle.standardError.write("\n".data(using: .utf8)!)
        let sorted = samples.sorted()
        func percentile(_ p: Double) -> Double { sorted[min(sorted.count - 1, Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1 < 0 ? 0 : Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1)] }
        print(String(format: "membership (%@, lease %d ms, %d trials): death to committed configuration: median %.1f ms, p99 %.1f ms, max %.1f ms",
                     coordination, leaseMs, trials, percentile(50), percentile(99), sorted.last!))
        if let json {
            let document: [String: Double] = ["median_ms": percentile(50), "p99_ms": percentile(99), "max_ms": sorted.last!, "trials": Double(trials), "lease_ms": Double(leaseMs)]
            try JSONEncoder().encode(document).write(to: URL(fileURLWithPath: json))
        }
    }
}

/// What a run with `--crash` measured: from the crash to the survivors' new configuration, to
/// every region active (the last survivor's recovery applied), and to 80% of the throughput of
/// the 200 ms before (the first millisecond from which a 5 ms moving mean reaches it again, once
/// it has fallen below).
struct CrashFigures {
    var configurationMilliseconds: Double?
    var activeMilliseconds: Double?
    /// When the last survivor let commits outside the recovering regions go ahead (every member
    /// acknowledged), and how many regions stayed blocked until every region was active.
    var outsideMilliseconds: Double?
    var recoveringRegions: Int?
    var regions = 0
    var eightyPercentMilliseconds: Double?
    var before: Double = 0
    var crashed: NodeID

    init(report: RunReport, cluster: Cluster, crashed: NodeID) {
        self.crashed = crashed
        guard let bins = report.millisecondBins, let crashBin = report.crashBin, let crashAt = report.crashNanoseconds else { return }
        let timelines = cluster.membership.filter { $0.node != crashed }.flatMap { $0.recoveryTimelines.filter { $0.removed.contains(crashed) } }
        if let seen = timelines.map(\.seenAt).min(), seen >= crashAt { configurationMilliseconds = Double(seen - crashAt) / 1e6 }
        if let done = timelines.map({ $0.seenAt + $0.applied }).max(), done >= crashAt { activeMilliseconds = Double(done - crashAt) / 1e6 }
        let partial = timelines.filter { $0.recoveringRegions != nil }
        if !partial.isEmpty, partial.count == timelines.count, let open = partial.map({ $0.seenAt + $0.acknowledged }).max(), open >= crashAt {
            outsideMilliseconds = Double(open - crashAt) / 1e6
            recoveringRegions = partial.compactMap(\.recoveringRegions).max()
        }
        regions = cluster.servingNodes.first?.engine.configuration.regions.count ?? 0
        let window = bins[max(0, crashBin - 200)..<crashBin]
        before = window.isEmpty ? 0 : Double(window.reduce(0, +)) * 1_000 / Double(window.count)
        // The first millisecond from which the moving mean is back at 80%, after it first fell
        // below (commits that need no answer of the crashed node go on for a few ms after the crash).
        var index = crashBin
        var fell = false
        while index + 5 <= bins.count {
            let rate = Double(bins[index..<(index + 5)].reduce(0, +)) * 1_000 / 5
            if !fell {
                fell = rate < 0.8 * before
            } else if rate >= 0.8 * before {
                eightyPercentMilliseconds = Double(index - crashBin)
                break
            }
            index += 1
        }
    }

    var summary: String {
        func ms(_ value: Double?) -> String { value.map { String(format: "%.1f ms", $0) } ?? "not reached" }
        let outside = outsideMilliseconds.map { ", regions outside recovery active at +\(ms($0)) (\(recoveringRegions ?? 0) of \(regions) recovering)" } ?? ""
        return "  crash                \(crashed): new configuration seen at +\(ms(configurationMilliseconds))\(outside), every region active at +\(ms(activeMilliseconds)), 80% of the throughput before (\(String(format: "%.0f", before))/s) at +\(ms(eightyPercentMilliseconds))"
    }
}
