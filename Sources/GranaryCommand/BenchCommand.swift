import ArgumentParser
import Foundation
import Granary
import GranaryWorkloads

/// `granary bench`: transaction throughput on an embedded cluster, no set-up needed.
struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure transaction throughput on an embedded cluster.",
        discussion: "Workloads: transfer (2 reads + 2 writes between random accounts).",
        subcommands: [TransferBench.self]
    )
}

/// Options every workload shares.
struct BenchOptions: ParsableArguments {
    @Option(help: "Nodes in the embedded cluster.") var nodes: Int = 3
    @Option(help: "Replicas of every region (primary + backups), at most --nodes.") var replicas: Int = 3
    @Option(help: "Worker threads issuing transactions, spread over the nodes.") var workers: Int = 2
    @Option(help: "Measured seconds.") var seconds: Double = 5
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Option(help: "Transport: shm.") var transport: String = "shm"
    @Option(help: "Region size in MiB.") var regionMib: Int = 64
    @Option(help: "Write the figures and the configuration as JSON to this file.") var json: String?
    @Flag(help: "No live progress line.") var quiet = false

    func validate() throws {
        guard nodes >= 1, nodes <= NodeID.limit else { throw ValidationError("--nodes must be in 1...\(NodeID.limit)") }
        guard replicas >= 1, replicas <= nodes else { throw ValidationError("--replicas must be in 1...--nodes (\(nodes))") }
        guard workers >= 1 else { throw ValidationError("--workers must be at least 1") }
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
        guard transport == "shm" else { throw ValidationError("--transport \(transport) is not available for benchmarks; use shm") }
        guard regionMib >= 1, regionMib & (regionMib - 1) == 0 else { throw ValidationError("--region-mib must be a power of two") }
    }

    func makeCluster() async throws -> Cluster {
        var options = ClusterOptions()
        options.regionSize = regionMib << 20
        options.engine.maximumAttempts = 1_000
        return try await Cluster.local(nodes: nodes, replicas: replicas, options: options)
    }
}

/// Runs a workload end to end: load, run with progress, check, report.
func runBenchmark(_ name: String, _ workload: inout some Workload, _ options: BenchOptions) async throws {
    let cluster = try await options.makeCluster()
    FileHandle.standardError.write("loading \(name) into \(options.nodes) nodes, \(options.replicas) replicas...\n".data(using: .utf8)!)
    try await workload.load(into: cluster)
    let quiet = options.quiet
    let report = Runner.run(workload, on: cluster, workers: options.workers, seconds: options.seconds, seed: options.seed) { line in
        if !quiet { FileHandle.standardError.write(("\r" + line).data(using: .utf8)!) }
    }
    if !quiet { FileHandle.standardError.write("\n".data(using: .utf8)!) }
    try await cluster.quiesce()
    let violations = try await workload.check(cluster)
    print(BenchTable.render(name: name, report: report, options: options))
    if let json = options.json {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let document = BenchDocument(workload: name, nodes: options.nodes, replicas: options.replicas, workers: options.workers,
                                     seconds: options.seconds, seed: options.seed, transport: options.transport, report: report,
                                     invariantViolations: violations)
        try encoder.encode(document).write(to: URL(fileURLWithPath: json))
    }
    try await cluster.shutdown()
    if !violations.isEmpty {
        throw ValidationError("the \(name) invariant does not hold after the run: \(violations.joined(separator: "; "))")
    }
    print("invariant: holds")
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
}

enum BenchTable {
    static func render(name: String, report: RunReport, options: BenchOptions) -> String {
        func micro(_ ns: UInt64?) -> String { String(format: "%.1f us", Double(ns ?? 0) / 1000) }
        var lines: [String] = []
        lines.append("\(name): \(options.nodes) nodes, \(options.replicas) replicas, \(options.workers) workers, \(options.transport), \(String(format: "%.1f", report.seconds)) s")
        lines.append(String(format: "  committed            %12d  (%.0f/s)", report.committed, report.committedPerSecond))
        for type in report.byType where report.byType.count > 1 {
            lines.append(String(format: "    %-20@ %10d  (%.0f/s)", type.name as NSString, type.committed, type.perSecond))
        }
        lines.append(String(format: "  abort rate           %11.2f%%  (%d aborted attempts)", report.abortRate * 100, report.aborts.values.reduce(0, +)))
        for (cause, count) in report.aborts.sorted(by: { $0.key < $1.key }) {
            lines.append(String(format: "    %-20@ %10d", cause as NSString, count))
        }
        lines.append("  latency              p50 \(micro(report.latencyNanoseconds["p50"]))  p90 \(micro(report.latencyNanoseconds["p90"]))  p99 \(micro(report.latencyNanoseconds["p99"]))  p99.9 \(micro(report.latencyNanoseconds["p99.9"]))")
        let phases = Phase.allCases.compactMap { phase in
            report.phaseMeanNanoseconds[phase.description].map { "\(phase) \(String(format: "%.1f", $0 / 1000)) us" }
        }
        lines.append("  phases (mean)        " + phases.joined(separator: "  "))
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
        try await runBenchmark("transfer", &workload, options)
    }
}
