// A program that runs transactions against a cluster of node processes, as one of its clients (a
// member that holds no region). Start the cluster first:
//
//   granary cluster init --directory /tmp/shop --nodes 3 --clients 1
//   granary cluster up --directory /tmp/shop
//   swift run example-client /tmp/shop/cluster.json
//   granary cluster down --directory /tmp/shop
//
// The client allocates ten counters in the nodes' regions (at their primaries), moves units
// between them from concurrent tasks, and checks that none was lost or made up.
import Foundation
import Granary

guard CommandLine.arguments.count == 2 else {
    FileHandle.standardError.write(Data("usage: example-client CLUSTER_FILE (a cluster.json with a client member; see granary cluster init --clients)\n".utf8))
    exit(64)
}
let cluster = try await Cluster.connect(file: FilePath(CommandLine.arguments[1]))
let client = cluster.nodes[0]
print("connected to \(cluster.configuration.cluster) as client \(client.id)")

let counters = try await client.transaction { tx in try (0..<10).map { _ in try tx.allocate(Int64(100)) } }
let regions = Set(counters.map(\.region)).sorted().map(\.description).joined(separator: ", ")
print("10 counters of 100 units in \(regions)")

// Eight tasks move units between random counters; a move that would go below zero is refused
// (the transaction's body throws, and nothing is written).
struct Empty: Error {}
let moved = try await withThrowingTaskGroup(of: Int.self) { group in
    for _ in 0..<8 {
        group.addTask {
            var moves = 0
            var random = SystemRandomNumberGenerator()
            for _ in 0..<250 {
                let from = counters[Int.random(in: 0..<counters.count, using: &random)]
                let to = counters[Int.random(in: 0..<counters.count, using: &random)]
                guard from != to else { continue }
                let units = Int64.random(in: 1...20, using: &random)
                do {
                    try await client.transaction { tx in
                        let balance = try tx.read(from, as: Int64.self)
                        guard balance >= units else { throw Empty() }
                        try tx.write(from, balance - units)
                        try tx.write(to, try tx.read(to, as: Int64.self) + units)
                    }
                    moves += 1
                } catch is Empty {
                }
            }
            return moves
        }
    }
    var sum = 0
    for try await moves in group { sum += moves }
    return sum
}
let total = try await client.transaction { tx in try counters.map { try tx.read($0, as: Int64.self) }.reduce(0, +) }
print("\(moved) moves committed; the counters hold \(total) units in all")
try await cluster.shutdown()
guard total == 1_000 else {
    FileHandle.standardError.write(Data("example-client: the counters hold \(total) units, not 1000\n".utf8))
    exit(1)
}
